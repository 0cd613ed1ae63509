"""Data replay at a compute-equivalent ratio (Ibrahim et al. 2024, "Simple and Scalable Strategies to
Continually Pre-train Large Language Models", Sec. 5.1): a fraction of every batch's rows is drawn from earlier
domains' corpora and/or the suite's general corpus instead of the stage's own, so a run trains on exactly as
many tokens as naive. The first stage has no earlier domain: with `sources: earlier` it replays nothing (its
count in the summary is 0)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.data.batches import MaskingCollator
from cpt_bench.training.plugin import Method, MethodSettings, register


@dataclasses.dataclass
class ReplaySettings(MethodSettings):
    ratio: float = 0.05  # the fraction of each batch's rows replayed (rounded per micro-batch; the counts are kept)
    sources: Literal["earlier", "general", "both"] = "earlier"  # earlier domains, the suite's general corpus

    def check(self, where: str) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise BadInput(f"{where}.ratio: must be in [0, 1), got {self.ratio}")


@register
class Replay(Method):
    name = "replay"
    supports_fsdp = True
    description = "naive DAP with a fraction of every batch replayed from earlier domains and/or general text " \
                  "(compute-equivalent: the same tokens as naive)"
    Settings = ReplaySettings

    def before_sequence(self, sequence):
        self.corpus_blocks = sequence.corpus_blocks
        if self.settings.sources != "earlier" and self.settings.ratio > 0:
            try:
                self.corpus_blocks("general")
            except KeyError:
                raise BadInput(f"replay.sources={self.settings.sources}: the suite names no general_corpus") from None
        self.generator = torch.Generator().manual_seed(sequence.seed * 1000 + 17)
        self.earlier: list[str] = []  # corpora of the stages done
        self.replayed: list[dict[str, int]] = []  # per stage: source corpus -> tokens replayed
        self.stage_tokens: dict[str, int] = {}

    def before_stage(self, stage):
        if not stage.resumed:
            self.stage_tokens = {}
        sources = {"earlier": self.earlier, "general": ["general"], "both": [*self.earlier, "general"]}
        self.pool = list(dict.fromkeys(sources[self.settings.sources]))
        self.collate = MaskingCollator(stage.tokenizer, stage.settings.mlm_probability, self.generator)

    def loss(self, stage, batch):
        rows = batch["input_ids"].shape[0]
        count = round(self.settings.ratio * rows)
        if count == 0 or not self.pool:
            return stage.lm_loss(batch)
        picks = torch.randint(len(self.pool), (count,), generator=self.generator).tolist()
        examples = []
        for source in picks:
            blocks = self.corpus_blocks(self.pool[source])
            examples.append(blocks[int(torch.randint(len(blocks), (1,), generator=self.generator))])
        replay = {k: v.to(batch[k].device) for k, v in self.collate(examples).items()}
        for source, mask in zip(picks, replay["attention_mask"]):
            name = self.pool[source]
            self.stage_tokens[name] = self.stage_tokens.get(name, 0) + int(mask.sum())
        return stage.lm_loss(splice(batch, replay, rows - count))

    def after_stage(self, stage):
        self.replayed.append(dict(self.stage_tokens))
        self.earlier += [c for c in stage.plan.corpora if c not in self.earlier]
        self.stage_tokens = {}

    def summary(self):
        return {"replayed_tokens": self.replayed, "sources": self.settings.sources}

    def state_dict(self):
        return {"generator": self.generator.get_state(), "earlier": list(self.earlier),
                "replayed": [dict(r) for r in self.replayed], "stage_tokens": dict(self.stage_tokens)}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.earlier, self.replayed = list(state["earlier"]), [dict(r) for r in state["replayed"]]
        self.stage_tokens = dict(state["stage_tokens"])


def splice(batch: dict[str, torch.Tensor], replay: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """The first `keep` rows of `batch` followed by the rows of `replay`, padded to a common length (padding is
    masked out of attention and of the loss)."""
    length = max(batch["input_ids"].shape[1], replay["input_ids"].shape[1])
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}

    def padded(tensor, key):
        extra = length - tensor.shape[1]
        return tensor if extra == 0 else torch.nn.functional.pad(tensor, (0, extra), value=fill[key])

    return {key: torch.cat([padded(batch[key][:keep], key), padded(replay[key], key)]) for key in batch}
