"""The cache of derived artefacts (tokenised blocks, built models, generated suites, base scores): where it
is, and how an entry is built so that concurrent runs neither see a half-built entry nor build it twice."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """`CPT_BENCH_CACHE`, or ~/.cache/cpt-bench."""
    root = os.environ.get("CPT_BENCH_CACHE") or Path.home() / ".cache" / "cpt-bench"
    return Path(root)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside a cache entry while it is built: concurrent runs that need the same slow
    entry (the default suite's base model) wait for the first builder instead of each building it again."""
    import fcntl

    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def building(path: Path) -> Iterator[Path]:
    """Build a cache folder under a temporary name, then move it into place whole: a reader never sees a
    half-built entry, and of two processes building the same entry the first one's is kept."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, path)
