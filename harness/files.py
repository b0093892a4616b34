"""Output files appear whole or not at all: `atomic_path` stages a file beside its target and renames it in on success.

Every module that writes a user-visible file (traces, comparison.json, reports, golden sets) goes through it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import HarnessError


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise HarnessError(f"{path}: {path.parent} is a file, not a folder; choose an output path in a folder")
    if not path.parent.is_dir():
        raise HarnessError(f"{path}: output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise HarnessError(f"{path}: is a folder, expected a file name")
    tmp = _temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def move_into(out: Path, staged: list[Path], previous: tuple[str, ...]) -> list[str]:
    """Staged files moved into the folder `out` (made if needed), after the files named `previous` there (a previous
    run's) are removed; returns the names removed."""
    out.mkdir(exist_ok=True)
    replaced = [name for name in previous if (out / name).is_file()]
    for name in replaced:
        (out / name).unlink()
    for source in staged:
        os.replace(source, out / source.name)
    return replaced
