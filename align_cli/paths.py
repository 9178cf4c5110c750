"""Where align keeps what it derives once and reuses: converted builtin models, reference caches."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$ALIGN_CACHE`, else `$XDG_CACHE_HOME/align`, else `~/.cache/align`."""
    if os.environ.get("ALIGN_CACHE"):
        return Path(os.environ["ALIGN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "align"
