"""Atomic writes of directories and single files: build in a temporary sibling, then rename onto the destination.

Nothing half-written is ever visible at the destination: a failure removes the temporary directory
or file, and an existing destination is replaced only once the new one is complete
(``atomic_dir`` for directories, ``atomic_file`` for one file).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def tmp_sibling(dst: str | os.PathLike) -> Path:
    """A new empty directory beside ``dst`` (same filesystem, so the final rename is atomic)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def commit_dir(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``tmp`` onto ``dst``; an existing ``dst`` is moved aside first and removed afterwards."""
    tmp, dst = Path(tmp), Path(dst)
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rmdir(old)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(dst) as tmp:`` write into ``tmp``; on success it becomes ``dst``.

    On any exception the temporary directory is removed and ``dst`` is left as it was.
    """
    tmp = tmp_sibling(dst)
    try:
        yield tmp
        commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """``with atomic_file(dst) as tmp:`` write the file ``tmp``; on success it replaces ``dst`` (``os.replace``).

    ``tmp`` is a new, not yet existing path beside ``dst`` (same filesystem) ending in ``suffix``
    (default: ``dst``'s own suffix, so writers that look at the extension, such as ``np.save`` or PyAV,
    behave as for ``dst``). On any exception ``tmp`` is removed and ``dst`` is left as it was.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{dst.suffix if suffix is None else suffix}")
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
