"""Atomic writes: a reader (or a crash) never sees a partial file, because everything is written under a
temporary name in the target's folder and then renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
