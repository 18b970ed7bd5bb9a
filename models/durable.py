"""Atomic, durable file replacement: write beside the target, fsync, rename, fsync the folder.

A rename alone is atomic for other processes, but after a power cut or a full
disk the file system may hold the new name pointing at data that never reached
the disk. Flushing the temporary file before the rename, and the folder after
it, leaves either the old file or the complete new one. Nothing here knows
about Flower: the apps, the models' caches and the tests all use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk (opened read-only: works on any file we just wrote)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(path: str | Path) -> None:
    """Flush ``path``'s directory entries (a rename is durable only once its folder is).

    Windows cannot open a folder for fsync; there the rename is left to the file system.
    """
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_durably(temporary: str | Path, path: str | Path) -> Path:
    """Rename the complete ``temporary`` file to ``path`` (same folder), flushed before and after."""
    fsync_file(temporary)
    os.replace(temporary, path)
    fsync_folder(Path(path).parent)
    return Path(path)


def write_atomic(path: str | Path, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Call ``write(temporary)`` for a file beside ``path``, then :func:`replace_durably` it to ``path``.

    A crash or an error inside ``write`` leaves the previous ``path`` untouched
    (the half-written temporary file is removed on an error). ``suffix`` ends the
    temporary name (e.g. ``.tmp.png`` for writers that pick the format by suffix).
    """
    path = Path(path)
    temporary = path.with_name(path.name + suffix)
    try:
        write(temporary)
        return replace_durably(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` of a UTF-8 text file."""
    return write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
