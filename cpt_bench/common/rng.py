"""Random-number state: derived seeds, and the state of every generator a run draws from (Python, NumPy,
torch, CUDA), as a checkpoint keeps it."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (so a task's fine-tuning seed does not depend on run order)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
             "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_as_json() -> dict[str, Any]:
    """`rng_state()` with its tensors as lists (for a JSON file); `set_rng_state` takes either form."""
    state = rng_state()
    return {"python": state["python"], "torch": state["torch"].tolist(),
            "numpy": [state["numpy"][0], state["numpy"][1].tolist(), *state["numpy"][2:]],
            **({"cuda": [t.tolist() for t in state["cuda"]]} if "cuda" in state else {})}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` (tensors may come back as lists from JSON)."""
    def as_bytes(value) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.uint8)

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(as_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_bytes(t) for t in state["cuda"]])


def process_rng_state(accelerator=None, as_json: bool = False) -> dict[str, Any]:
    """This process's `rng_state()`; with several processes, every process's, by rank (each draws its own
    dropout), gathered to all of them. With several processes this is a collective: every process calls it."""
    state = rng_state_as_json() if as_json else rng_state()
    if accelerator is None or accelerator.num_processes == 1:
        return state
    from accelerate.utils import gather_object

    return {"per_process": gather_object([state])}


def set_process_rng_state(state: dict[str, Any], accelerator=None) -> None:
    """Restore `process_rng_state()`: a process takes its own rank's state."""
    if "per_process" in state:
        from cpt_bench.common.errors import BadInput

        processes = 1 if accelerator is None else accelerator.num_processes
        if len(state["per_process"]) != processes:
            raise BadInput(f"the checkpoint was made by {len(state['per_process'])} processes and this run has "
                           f"{processes}: resume with {len(state['per_process'])}, or add --fresh to start over")
        state = state["per_process"][accelerator.process_index]
    set_rng_state(state)
