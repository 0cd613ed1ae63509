"""Atomic writes: a reader (or a crash) never sees a partial file, because everything is written under a
temporary name in the target's folder and then renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpt_bench.common.errors import BadInput


def write_with(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(temporary_path)` in `path`'s folder, then rename the temporary file to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_safetensors_atomic(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    write_with(path, lambda tmp: save_file(tensors, tmp))


def check_writable_folder(folder: Path, option: str) -> None:
    """BadInput in one line unless `folder` is (or can be made) a folder that files can be written into: found
    before any work, not when the first file is written. Tried by writing, since permission bits do not bind
    root and say nothing of a read-only mount."""
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"{option} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, test_file = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(test_file)
    except OSError as error:
        raise BadInput(f"{option} {folder}: cannot write into it ({error.strerror or error})") from None


def check_writable_file(path: Path, option: str) -> None:
    """BadInput in one line unless a file can be written at `path` (its folder writable, the path no folder)."""
    if path.is_dir():
        raise BadInput(f"{option} {path}: is a folder, not a file")
    check_writable_folder(path.parent, option)
