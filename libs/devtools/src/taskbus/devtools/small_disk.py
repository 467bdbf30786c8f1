"""A small disk for the disk-full tests: a tmpfs mounted over a directory, and a filler that
uses up every byte of it (deleting the filler gives the space back)."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path


class SmallDiskUnavailable(Exception):
    """No tmpfs can be mounted here (mounting needs root)."""


@contextlib.contextmanager
def small_disk(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "8m") over `directory` until the block ends."""
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise SmallDiskUnavailable(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(disk: Path) -> Path:
    """Write to `disk` until it is full; the file that filled it. Unbuffered: a buffered file
    holding the last bytes that did not fit raised ENOSPC again on close (a CI failure)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return filler
