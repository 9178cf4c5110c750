"""The one exception type for a user's mistake.

The CLI turns `UserError` into a one-paragraph message and exit code 2 with no traceback; any
other exception is an internal failure (exit code 1, traceback shown).
"""


class UserError(Exception):
    """Bad input from the user: a recipe key, a file, a dataset column, a value.

    The message must name what is wrong (file, key, row or value) and say how to fix it.
    """
