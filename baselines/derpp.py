"""DER++: Dark Experience Replay++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline").

A reservoir buffer keeps a uniform sample of every MLM block seen in training (its masked input, attention
mask and labels) with the logits the model gave the block's masked positions when it was seen. The loss of a
micro-batch is MLM + alpha * MSE(logits, stored logits) on one replay draw + beta * MLM on a second,
independent draw (Eq. 6 and Algorithm 1; the two draws share one forward pass). As in the paper, replay
starts as soon as the buffer holds anything (so also within the first domain), and the buffer is filled
during training.

Memory: the logits are over the full vocabulary at each stored block's masked positions, about
buffer_size x mlm_probability x seq_len x vocabulary numbers, kept in float16 by default (`logits_dtype`):
0.3 MB on the default suite (512 blocks x ~4.5 positions x 71 words), but ~4 GB for RoBERTa (vocabulary 50k)
with 512-token blocks. So the buffer lives in host memory: only the rows a step replays move to the device.
With several processes each keeps its own reservoir over the blocks it sees (together a uniform sample too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.models.loading import head_outputs, masked_logits
from cpt_bench.training.plugin import Method, MethodSettings, register
from cpt_bench.training.stage import SequenceState


@dataclasses.dataclass
class DerppSettings(MethodSettings):
    # alpha: weight of logit matching on replayed blocks (DER's term); beta: weight of the MLM loss on replayed
    # blocks (the "++" term; 0 gives DER). 1 and 1 = the best of the grid 0.1, 0.3, 1, 3 with beta tied to
    # alpha, under the tuning protocol (dev slices, seeds 100 and 101): results/sweeps/derpp.alpha.md
    alpha: float = 1.0
    beta: float = 1.0
    buffer_size: int = 512  # blocks kept
    replay_batch_size: int | None = None  # blocks per replay draw; None: as many as the micro-batch has
    logits_dtype: Literal["float16", "float32"] = "float16"  # storage of the kept logits

    def check(self, where: str) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise BadInput(f"{where}: alpha and beta must be non-negative, got {self.alpha} and {self.beta}")
        if self.buffer_size <= 0:
            raise BadInput(f"{where}.buffer_size: must be positive, got {self.buffer_size}")
        if self.replay_batch_size is not None and self.replay_batch_size <= 0:
            raise BadInput(f"{where}.replay_batch_size: must be positive, got {self.replay_batch_size}")


class ReservoirBuffer:
    """Up to `size` MLM blocks and their masked-position logits, on the CPU: a uniform sample of the stream of
    blocks offered to it (reservoir sampling, Vitter 1985, Algorithm R)."""

    def __init__(self, size: int, generator: torch.Generator, logits_dtype: torch.dtype = torch.float16):
        self.size = size
        self.generator = generator
        self.logits_dtype = logits_dtype
        self.seen = 0  # blocks offered so far
        self.input_ids: torch.Tensor | None = None  # [size, length], allocated at the first block
        self.attention_mask: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.logits: list[torch.Tensor | None] = [None] * size  # per slot: [masked positions, vocabulary]

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def _slot(self) -> int | None:
        """Where the next block of the stream goes (None: not kept). Block n (0-based) replaces a random slot
        with probability size / (n + 1), which keeps every block seen equally likely to be in the buffer."""
        n = self.seen
        self.seen += 1
        if n < self.size:
            return n
        j = int(torch.randint(n + 1, (1,), generator=self.generator))
        return j if j < self.size else None

    def add(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
            logits: torch.Tensor) -> None:
        """Offer a batch of blocks; `logits` holds their masked positions' rows in row-major order."""
        slots = [self._slot() for _ in range(len(input_ids))]
        kept = [row for row, slot in enumerate(slots) if slot is not None]
        if not kept:
            return
        if self.input_ids is None:
            shape = (self.size, input_ids.shape[1])
            self.input_ids = torch.zeros(shape, dtype=input_ids.dtype)
            self.attention_mask = torch.zeros(shape, dtype=attention_mask.dtype)
            self.labels = torch.full(shape, -100, dtype=labels.dtype)
        per_row = logits.detach().split((labels != -100).sum(1).tolist())
        index = torch.tensor(kept, device=input_ids.device)
        # one transfer of the kept rows only (most blocks of a long stream are not kept)
        ids, mask, targets = (t.index_select(0, index).cpu() for t in (input_ids, attention_mask, labels))
        kept_logits = torch.cat([per_row[row] for row in kept]).to("cpu", self.logits_dtype)
        kept_logits = kept_logits.split((targets != -100).sum(1).tolist())
        for position, row in enumerate(kept):  # in stream order: a later block wins a slot drawn twice
            slot = slots[row]
            self.input_ids[slot] = ids[position]
            self.attention_mask[slot] = mask[position]
            self.labels[slot] = targets[position]
            self.logits[slot] = kept_logits[position]

    def sample(self, count: int, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`count` distinct stored blocks (all, if fewer are stored), as a batch on `device`, and their stored
        logits (masked positions in row-major order)."""
        chosen = torch.randperm(len(self), generator=self.generator)[:count]
        batch = {"input_ids": self.input_ids[chosen], "attention_mask": self.attention_mask[chosen],
                 "labels": self.labels[chosen]}
        logits = torch.cat([self.logits[i] for i in chosen.tolist()])
        return {k: v.to(device) for k, v in batch.items()}, logits.to(device)

    def numbers(self) -> int:
        """Numbers held (token ids, masks, labels and logits)."""
        if self.input_ids is None:
            return 0
        return 3 * self.input_ids.numel() + sum(t.numel() for t in self.logits if t is not None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        n = len(self)
        if n == 0:
            return {"seen": torch.tensor(self.seen), "generator": self.generator.get_state()}
        return {"seen": torch.tensor(self.seen), "generator": self.generator.get_state(),
                "input_ids": self.input_ids[:n].clone(), "attention_mask": self.attention_mask[:n].clone(),
                "labels": self.labels[:n].clone(), "logits": torch.cat(self.logits[:n])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
        self.input_ids = self.attention_mask = self.labels = None
        self.logits = [None] * self.size
        if "input_ids" not in state:
            return
        n = len(state["input_ids"])
        if n != len(self):
            raise ValueError(f"replay buffer state holds {n} blocks, expected {len(self)} "
                             "(was buffer_size changed?)")
        shape = (self.size, state["input_ids"].shape[1])
        self.input_ids = torch.zeros(shape, dtype=state["input_ids"].dtype)
        self.attention_mask = torch.zeros(shape, dtype=state["attention_mask"].dtype)
        self.labels = torch.full(shape, -100, dtype=state["labels"].dtype)
        self.input_ids[:n] = state["input_ids"]
        self.attention_mask[:n] = state["attention_mask"]
        self.labels[:n] = state["labels"]
        counts = (state["labels"] != -100).sum(1).tolist()
        self.logits[:n] = list(state["logits"].to(self.logits_dtype).split(counts))


@register
class Derpp(Method):
    name = "derpp"
    aliases = ("der++",)
    description = "DER++: reservoir replay of past blocks with logit matching and MLM (Buzzega et al. 2020)"
    Settings = DerppSettings

    def __init__(self, settings: DerppSettings | None = None):
        super().__init__(settings)
        dtype = torch.float16 if self.settings.logits_dtype == "float16" else torch.float32
        self.buffer = ReservoirBuffer(self.settings.buffer_size, torch.Generator().manual_seed(0), dtype)

    # ---- events
    def before_sequence(self, sequence: SequenceState) -> None:
        process = sequence.accelerator.process_index if sequence.accelerator is not None else 0
        self.buffer.generator.manual_seed(sequence.seed * 7919 + process)  # each process its own draws

    def loss(self, stage, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with head_outputs(stage.model) as outputs:
            loss = stage.lm_loss(batch)
        if len(self.buffer):
            replay = self._replay(stage, len(batch["input_ids"]))
            stage.log_term("replay", replay)
            loss = loss + replay
        # the blocks enter the reservoir with this forward's logits: the model as it was when they were seen
        (logits,) = outputs or [torch.empty(0, stage.model.config.vocab_size)]  # lm_loss: one head call
        self.buffer.add(batch["input_ids"], batch["attention_mask"], batch["labels"], logits)
        return loss

    def _replay(self, stage, rows: int) -> torch.Tensor:
        """alpha * MSE on the logits of one draw + beta * MLM on another (Algorithm 1), in one forward."""
        s = self.settings
        count = s.replay_batch_size or rows
        device = stage.accelerator.device
        draws, stored = [], None
        if s.alpha > 0:
            first, stored = self.buffer.sample(count, device)
            draws.append(first)
        if s.beta > 0:
            draws.append(self.buffer.sample(count, device)[0])
        if not draws:
            return torch.zeros((), device=device)
        batch = {k: torch.cat([d[k] for d in draws]) for k in draws[0]}
        logits = masked_logits(stage.model, batch).float()
        matched = len(stored) if stored is not None else 0
        total = logits.sum() * 0.0  # keeps the graph connected when a draw has no masked position
        if matched:
            total = total + s.alpha * F.mse_loss(logits[:matched], stored.float())
        if s.beta > 0 and len(logits) > matched:
            labels = draws[-1]["labels"]
            total = total + s.beta * F.cross_entropy(logits[matched:], labels[labels != -100])
        return total

    # ---- accounting and checkpoints
    def overhead(self, model: nn.Module) -> dict[str, int]:
        return {"extra_parameters": 0, "extra_optimizer_state": 0, "buffers": self.buffer.numbers()}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
