"""Checkpoints and resume: a run's work directory, keyed by its full configuration.

A run writes `<output>/.work/<result stem>/`:

- `progress.json`: everything already measured (matrix rows, probe and perplexity rows, stage records, the
  end-task scores of a row being evaluated, each with the RNG state after it);
- `ckpt-<stage>-<step>/`: the newest checkpoint, with `state.safetensors` (every tensor: model, optimizer,
  method state, RNG states) and `state.json` (everything else, with references into the tensor file).
  `step` = the stage's step count, so `ckpt-2-150` of a 150-step stage is "stage 2 trained, not evaluated".

Checkpoints load with safetensors and JSON only (never pickle). Each is written under a temporary name and
renamed when complete, and the older ones are removed after it, so a crash at any moment leaves a usable one.
The work directory is removed once the result file is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpt_bench.atomic import write_json_atomic

TENSOR = "__tensor__"


# ---------------------------------------------------------------- nested state <-> safetensors + JSON

def flatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON skeleton of a nested state; its tensors go into `tensors` under generated keys."""
    if isinstance(tree, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = tree.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(tree, np.ndarray):
        return flatten(torch.from_numpy(tree.copy()), tensors) | {"numpy": True}
    if isinstance(tree, dict):
        if not all(isinstance(k, (str, int)) for k in tree):
            raise TypeError(f"checkpoint keys must be str or int, got {sorted(map(type, tree))}")
        # JSON object keys are strings: int keys (optimizer state) are kept apart so they come back as ints
        return {"__dict__": [[k, flatten(v, tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"__tuple__" if isinstance(tree, tuple) else "__list__": [flatten(v, tensors) for v in tree]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, (np.integer, np.floating)):
        return tree.item()
    raise TypeError(f"cannot checkpoint a {type(tree).__name__}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if TENSOR in skeleton:
            tensor = tensors[skeleton[TENSOR]]
            return tensor.numpy() if skeleton.get("numpy") else tensor
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
    return skeleton


def save_state(state: dict[str, Any], directory: Path) -> None:
    """Write `state` as one complete checkpoint folder (temporary name, then rename)."""
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    # shared storage (tied weights) cannot be saved twice by safetensors: give each entry its own copy
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if tensor.untyped_storage().data_ptr() in seen:
            tensors[key] = tensor.clone()
        seen.add(tensors[key].untyped_storage().data_ptr())
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_state(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "state.safetensors"))
    return unflatten(json.loads((directory / "state.json").read_text()), tensors)


# ---------------------------------------------------------------- stop requests (SIGINT / SIGTERM / SIGUSR2)

# SIGUSR2: what SLURM sends (submitit asks for it) shortly before a job's time limit or preemption; its default
# action would kill the run without a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

class StopRequested(Exception):
    """Raised at a safe point after a stop signal, once the checkpoint is written."""


class StopSignal:
    """Turns SIGINT/SIGTERM/SIGUSR2 into a flag that the run checks between steps (a second signal stops at once)."""

    def __init__(self, enabled: bool = True):
        self.received: str | None = None  # the signal this process received
        self.enabled = enabled  # off: the signals keep their default effect
        self._previous: dict[int, Any] = {}
        self._accelerator = None  # several processes: `requested` is agreed between them

    def across(self, accelerator) -> StopSignal:
        """With several processes, a signal received by any of them stops all at the same step: every read of
        `requested` is then a collective (each process reads it at the same points of the same loop)."""
        self._accelerator = accelerator if accelerator.num_processes > 1 else None
        return self

    @property
    def requested(self) -> str | None:
        if self._accelerator is not None:
            flag = torch.tensor([1.0 if self.received else 0.0], device=self._accelerator.device)
            if self._accelerator.reduce(flag, reduction="sum").item() > 0 and self.received is None:
                self.received = "a signal to another process"
        return self.received

    def __enter__(self) -> StopSignal:  # noqa: PYI034  (typing.Self needs Python 3.11)
        for sig in STOP_SIGNALS if self.enabled else ():
            # not the main thread (e.g. inside a test runner's worker): ValueError, and no handler
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


# ---------------------------------------------------------------- the work directory

class WorkDir:
    """The resumable state of one run (one method, order, seed and configuration)."""

    def __init__(self, path: Path, enabled: bool = True, writer: bool = True):
        self.path = path
        self.enabled = enabled
        self.writer = writer  # False: a process of a multi-process run other than the main one reads, never writes

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.json"

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def claim(self) -> None:
        """Say which process runs this run (owner.json: host and pid), so that `cpt-bench sweep status` sees a
        run started outside a sweep as running, and no sweep starts it a second time."""
        if self.enabled and self.writer:
            import socket

            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / "owner.json", {"host": socket.gethostname(), "pid": os.getpid()})

    def load_progress(self) -> dict[str, Any] | None:
        if not self.enabled or not self.progress_file.is_file():
            return None
        skeleton = json.loads(self.progress_file.read_text())
        return unflatten(skeleton, {})

    def save_progress(self, progress: dict[str, Any]) -> None:
        if not self.enabled or not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(progress, tensors)
        if tensors:
            raise TypeError("progress.json holds no tensors (put them in a checkpoint)")
        write_json_atomic(self.progress_file, skeleton)

    def checkpoints(self) -> list[tuple[int, int, Path]]:
        """Complete checkpoints, oldest first, as (stage, step, folder)."""
        found = []
        if self.path.is_dir():
            for entry in self.path.iterdir():
                match = re.fullmatch(r"ckpt-(\d+)-(\d+)", entry.name)
                if match and (entry / "state.json").is_file():
                    found.append((int(match[1]), int(match[2]), entry))
        return sorted(found)

    def latest(self) -> tuple[int, int, dict[str, Any]] | None:
        found = self.checkpoints()
        if not self.enabled or not found:
            return None
        stage, step, folder = found[-1]
        return stage, step, load_state(folder)

    def save_checkpoint(self, stage: int, step: int, state: dict[str, Any]) -> None:
        if not self.enabled or not self.writer:
            return
        folder = self.path / f"ckpt-{stage}-{step}"
        save_state(state, folder)
        for _, _, older in self.checkpoints():  # keep only the newest
            if older != folder:
                shutil.rmtree(older, ignore_errors=True)
