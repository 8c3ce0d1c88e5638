"""Where sevsim keeps files: the user's data directory, and per-platform state directories.

``SEVSIM_DATA`` overrides the data directory (default ``$XDG_DATA_HOME/sevsim``, i.e.
``~/.local/share/sevsim``); ``SEVSIM_STATE`` names a platform's state directory (default
``<data>/platforms/<profile>``).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    env = os.environ.get("SEVSIM_DATA")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "sevsim"


def default_state_dir(profile_name: str) -> Path:
    env = os.environ.get("SEVSIM_STATE")
    return Path(env) if env else data_dir() / "platforms" / profile_name
