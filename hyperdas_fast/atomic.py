"""Renaming a finished temporary file (or folder) into place, with ordinary permissions.

Every writer here (results, tables, plots, checkpoints, saved models, data caches, the
converted default model, benchmark JSON) writes a temporary file next to its target,
fsyncs it and renames it over the target, so a crash never leaves a half-written file.
``tempfile.mkstemp`` creates that file readable by its owner only (0600), ``mkdtemp`` a
folder 0700, and a rename keeps the mode: results written that way stayed private where
an ordinary ``open()`` would have made them readable by the group (umask 022 or 002), so
collaborators on a shared filesystem could not read them. ``publish`` first gives the
temporary the mode ``open()`` / ``mkdir()`` would have given it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def _read_umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only way to read it is to set it (and back)
    os.umask(mask)
    return mask


def ordinary_mode(directory: bool = False) -> int:
    """The mode ``open(path, "w")`` (0666) or ``mkdir`` (0777) gives a new file or folder
    under the process's current umask."""
    return (0o777 if directory else 0o666) & ~_read_umask()


def publish(tmp: PathLike, target: PathLike) -> Path:
    """Give ``tmp`` (a finished file or folder from mkstemp/mkdtemp) ordinary permissions and
    rename it over ``target`` (atomic within one filesystem). Returns ``target`` as a Path."""
    try:
        os.chmod(tmp, ordinary_mode(directory=os.path.isdir(tmp)))
    except OSError:  # a filesystem without modes (some FUSE mounts): keep what it gives
        pass
    os.replace(tmp, target)
    return Path(target)


__all__ = ["ordinary_mode", "publish"]
