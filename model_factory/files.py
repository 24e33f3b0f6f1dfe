"""Model files are replaced whole, never rewritten in place: every writer of one goes through here.

Workers map ``tables.bin`` and ``weights.pt`` (``MAP_SHARED``): truncating a mapped file kills every
process that then reads a page past its new end (``SIGBUS``), and writing into it changes the
scores of every worker that maps it. So a model file is written as a temporary file in its own
directory, flushed to disk, and renamed over the old one (``os.replace``, atomic): a process that
mapped or opened the old file keeps reading the old bytes, one that opens the path afterwards reads
the new file whole, a crash leaves one or the other, and a write that fails leaves the old file and
no temporary one.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def replacing(path: Path) -> Iterator[BinaryIO]:
    """A new file to write ``path``'s content into; it becomes ``path`` when the block ends without an error."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temporary, "xb") as file:  # a new file's mode (0666 less the umask), as open(path, "wb") gives
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def write_file(path: Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` (text as UTF-8)."""
    with replacing(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)


def move_into_place(staged: Path, target: Path) -> None:
    """Replace ``target`` by ``staged``, a file or a directory written elsewhere on ``target``'s file system.

    A directory cannot be renamed over a non-empty one: the old one is renamed aside first and
    removed after (its files are unlinked, not truncated, so a process that maps one keeps it),
    which leaves ``target`` missing for the moment between the two renames.
    """
    sync_tree(staged)
    if staged.is_dir() and target.is_dir():
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.old-", dir=target.parent) as old:
            target.rename(Path(old) / target.name)
            staged.rename(target)
    else:
        os.replace(staged, target)
    sync_directory(target.parent)


def sync_tree(path: Path) -> None:
    """Flush a file, or every file and directory under a directory, to disk."""
    if path.is_dir():
        for directory, _, names in os.walk(path):
            for name in names:
                with open(Path(directory, name), "rb") as file:
                    os.fsync(file.fileno())
            sync_directory(Path(directory))
    else:
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk, so a rename into it survives a crash."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
