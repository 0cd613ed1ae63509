"""Checkpoints and resume: a run's work directory, keyed by its full configuration.

A run writes `<output>/.work/<result stem>/`:

- `row-measurements.json`: the measurements of the row being evaluated (end-task, probe and perplexity scores),
  each with the RNG state after it (a work folder of the release before names it `progress.json`);
- `ckpt-<stage>-<step>/`: the two newest checkpoints, each with `state.safetensors` (every tensor: model,
  optimizer, method state, RNG states), `state.json` (everything else, with references into the tensor file)
  and `manifest.json` (the size and SHA-256 of both). `step` = the stage's step count, so `ckpt-2-150` of a
  150-step stage is "stage 2 trained, not evaluated";
- `../<result stem>.lock`: held (flock) by the process that runs the run, so a second identical run is refused.

Checkpoints load with safetensors and JSON only (never pickle), and only after their files match the manifest:
a damaged checkpoint (truncated, or overwritten in place at the same size) is never resumed from; the one
before it is, and with none left the run stops with one line. Each is written under a temporary name and
renamed when complete, and older ones are removed after it, so a crash at any moment leaves a usable one.
row-measurements.json carries the SHA-256 of its content too: a damaged one is set aside (its measurements are made
again, from the checkpoint's random state, to the same values). The work directory is removed once the result
file is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpt_bench.common.atomic import write_json_atomic

TENSOR = "__tensor__"
MANIFEST = "manifest.json"
KEPT_CHECKPOINTS = 2  # the newest, and the one to fall back to if the newest turns out damaged


class DamagedState(ValueError):
    """A checkpoint or row-measurements file whose content does not match its recorded checksum (or does not parse)."""


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
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
             for name in ("state.safetensors", "state.json")}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}))  # last: a folder with a manifest is complete
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_state(directory: Path) -> None:
    """DamagedState unless every file of the checkpoint has the size and SHA-256 its manifest records."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedState(f"{directory / MANIFEST}: missing or unreadable") from None
    for name, recorded in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != recorded["bytes"]:
            raise DamagedState(f"{path}: missing or not {recorded['bytes']} bytes")
        if file_sha256(path) != recorded["sha256"]:
            raise DamagedState(f"{path}: content does not match its SHA-256 in {MANIFEST}")


def load_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's state, after its files are checked against the manifest (DamagedState if not)."""
    from safetensors.torch import load_file

    verify_state(directory)
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
        self.damaged: list[str] = []  # what loading found damaged and passed over (said on stderr)
        self._lock = None

    @property
    def measurements_file(self) -> Path:
        return self.path / "row-measurements.json"

    def clear(self, release_lock: bool = True) -> None:
        """Remove the work folder (and, unless told not to, the run's lock: the run is over)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if release_lock and self._lock is not None:  # removed while held, so no other process can hold this file
            self.lock_file.unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    @property
    def lock_file(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")  # beside the folder, which `clear` removes

    def lock(self) -> str | None:
        """Take the run's lock for as long as this process lives (or until `clear`); None, or who holds it (an
        identical run started into the same output folder and still running)."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = self.lock_file.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                return holder
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.lock_file).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            handle.close()  # the holder finished and removed this file between our open and our lock: again
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._lock = handle  # the kernel releases it when the process ends, SIGKILL included
        return None

    def claim(self) -> None:
        """Say which process runs this run (owner.json: host and pid), so that `cpt-bench sweep status` sees a
        run started outside a sweep as running, and no sweep starts it a second time."""
        if self.enabled and self.writer:
            import socket

            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path / "owner.json", {"host": socket.gethostname(), "pid": os.getpid()})

    def load_measurements(self) -> dict[str, Any] | None:
        """The measurements of the row being evaluated; None when there are none, or when the file is damaged
        (then they are made again: each starts from the random state the checkpoint or the previous one left)."""
        path = self.measurements_file
        if self.enabled and not path.is_file() and (self.path / "progress.json").is_file():
            path = self.path / "progress.json"  # the file's name in a work folder of the release before
        if not self.enabled or not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            content = saved["measurements"] if "measurements" in saved else saved["progress"]
            if saved["sha256"] != _json_sha256(content):
                raise DamagedState("content does not match its SHA-256")
        except (OSError, ValueError, KeyError, TypeError) as error:
            self._pass_over(f"{path} ({str(error).splitlines()[0][:80]}): its measurements are made again")
            return None
        return unflatten(content, {})

    def save_measurements(self, measurements: dict[str, Any]) -> None:
        if not self.enabled or not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(measurements, tensors)
        if tensors:
            raise TypeError(f"{self.measurements_file.name} holds no tensors (put them in a checkpoint)")
        write_json_atomic(self.measurements_file, {"sha256": _json_sha256(skeleton), "measurements": skeleton})
        (self.path / "progress.json").unlink(missing_ok=True)  # an older release's file, superseded

    def _pass_over(self, what: str) -> None:
        if what not in self.damaged:
            self.damaged.append(what)
            print(f"warning: damaged, not used: {what}", file=sys.stderr, flush=True)

    def checkpoints(self) -> list[tuple[int, int, Path]]:
        """Complete checkpoints, oldest first, as (stage, step, folder)."""
        found = []
        if self.path.is_dir():
            for entry in self.path.iterdir():
                match = re.fullmatch(r"ckpt-(\d+)-(\d+)", entry.name)
                if match and (entry / "state.json").is_file():
                    found.append((int(match[1]), int(match[2]), entry))
        return sorted(found)

    def latest(self) -> Resumed | None:
        """The newest checkpoint whose files match their manifest; a damaged one is passed over (and said).
        DamagedState when every checkpoint there is damaged."""
        found = self.checkpoints()
        if not self.enabled or not found:
            return None
        passed_over = []
        for stage, step, folder in reversed(found):
            try:
                state = load_state(folder)
            except DamagedState as error:
                passed_over.append(str(error))
                continue
            for damage in passed_over:
                self._pass_over(f"{damage}; resuming from the checkpoint before it, {folder.name}")
            return Resumed(stage, step, checkpoint_from_content(state))
        raise DamagedState(f"every checkpoint in {self.path} is damaged (the newest: {passed_over[0]})")

    def save_checkpoint(self, stage: int, step: int, checkpoint: StageEnd | MidStage) -> None:
        if not self.enabled or not self.writer:
            return
        folder = self.path / f"ckpt-{stage}-{step}"
        save_state(checkpoint_content(checkpoint), folder)
        others = [entry for _, _, entry in self.checkpoints() if entry != folder]
        for older in others[: max(0, len(others) - (KEPT_CHECKPOINTS - 1))]:  # keep the newest ones
            shutil.rmtree(older, ignore_errors=True)


@dataclasses.dataclass
class StageEnd:
    """Saved once a stage is trained and again once its row is evaluated: the run resumes with the next row or
    stage, from these weights."""

    run: dict[str, Any]  # what the run has measured so far (results.RunMeasurements as a dict)
    method: dict[str, Any]  # Method.state_dict()
    model: dict[str, torch.Tensor]
    rng: dict[str, Any]  # every process-wide random state (rng.process_rng_state)
    trainer: dict[str, Any]  # DapTrainer.state_dict(): what the trainer carries from stage to stage

    kind = "stage_end"


@dataclasses.dataclass
class MidStage:
    """Saved every `--checkpoint-every` steps inside a stage and when a stop is requested: the trainer resumes
    the stage at the next step."""

    run: dict[str, Any]
    method: dict[str, Any]
    training: dict[str, Any]  # the trainer's stage state: weights, optimizer, schedule, losses, random state

    kind = "mid_stage"


@dataclasses.dataclass
class Resumed:
    """The newest sound checkpoint of a work directory."""

    stage: int
    step: int
    saved: StageEnd | MidStage


def checkpoint_content(checkpoint: StageEnd | MidStage) -> dict[str, Any]:
    """What a checkpoint folder holds (`save_state`)."""
    return {"kind": checkpoint.kind, **{f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(checkpoint)}}


def checkpoint_from_content(content: dict[str, Any]) -> StageEnd | MidStage:
    """The typed checkpoint of a folder's content (KeyError or TypeError for another layout)."""
    kinds = {cls.kind: cls for cls in (StageEnd, MidStage)}
    cls = kinds[content["kind"]]
    values = {f.name: content.get(f.name) for f in dataclasses.fields(cls)}
    if cls is StageEnd and values["trainer"] is None:  # written before the trainer kept its own state
        values["trainer"] = {"carried_optimizer": content["optimizer"]} if "optimizer" in content else {}
    return cls(**values)


def _json_sha256(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
