"""align: a command-line preference-alignment trainer for LLMs."""

__version__ = "0.1.0"
