"""Language-model data: a corpus cut into fixed-length blocks (views into its token file, `data.shards`),
BERT's masking for an encoder or the next tokens as labels for a decoder, and the ways the trainer and the
methods draw batches from a stage's blocks: the one place that builds them. Either way a batch is (input_ids,
attention_mask, labels) with -100 where nothing is scored, so one loss serves both kinds of LM
(`cpt_bench.models.loading.lm_loss`)."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from cpt_bench.common.deprecation import renamed
from cpt_bench.data.shards import TokenBlocks, corpus_blocks


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()[:16]


def lm_blocks(texts, tokenizer, seq_len: int, corpus_id: str, causal: bool = False) -> TokenBlocks:
    """The corpus (a `data.corpus.Corpus`, or a list of texts) as fixed-length training blocks for the LM's
    objective (`causal`: next-token blocks), read from its token file on disk (`data.shards`)."""
    return corpus_blocks(texts, tokenizer, seq_len, corpus_id, causal, tokenizer_fingerprint(tokenizer))


def mlm_blocks(texts, tokenizer, seq_len: int, corpus_id: str) -> TokenBlocks:
    """An encoder's blocks: the tokenised texts, each followed by the separator token, cut into blocks of
    [CLS] + seq_len-2 tokens + [SEP], fixed length, so DAP batches carry no padding."""
    return lm_blocks(texts, tokenizer, seq_len, corpus_id, causal=False)


def causal_blocks(texts, tokenizer, seq_len: int, corpus_id: str) -> TokenBlocks:
    """A decoder's packed blocks: the tokenised texts joined by the end-of-text token, cut into `seq_len` inputs
    whose labels are the next `seq_len` tokens (block i reads stream[i·L : i·L+L] and predicts stream[i·L+1 :
    i·L+L+1], so every token but the stream's first is a target once). No padding: every label is a real token."""
    return lm_blocks(texts, tokenizer, seq_len, corpus_id, causal=True)


class MaskingCollator:
    """BERT's masking: choose `probability` of the non-special, non-padding tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Labels are -100 everywhere else. Blocks that carry their own labels
    (a decoder's next tokens) are batched as they are: nothing is masked and the generator is not drawn from."""

    def __init__(self, tokenizer, probability: float = 0.15, generator: torch.Generator | None = None):
        self.mask_id = tokenizer.mask_token_id  # None for a decoder, whose blocks carry labels
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.pad_id = tokenizer.pad_token_id
        self.probability = probability
        self.generator = generator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        input_ids = _pad([torch.as_tensor(e["input_ids"]) for e in examples], self.pad_id)
        # real tokens by length, not by id: a decoder pads with its end-of-text token, which is also real text
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        if "labels" in examples[0]:
            labels = _pad([torch.as_tensor(e["labels"]) for e in examples], -100)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        inputs, labels = self.mask(input_ids)
        return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}

    def mask(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        maskable = ~torch.isin(input_ids, self.special_ids)
        chosen = (torch.rand(input_ids.shape, generator=g) < self.probability) & maskable
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        inputs = input_ids.clone()
        roll = torch.rand(input_ids.shape, generator=g)
        inputs[chosen & (roll < 0.8)] = self.mask_id
        random_positions = chosen & (roll >= 0.8) & (roll < 0.9)
        random_tokens = torch.randint(self.vocab_size, input_ids.shape, generator=g)
        inputs[random_positions] = random_tokens[random_positions]
        return inputs, labels


def _pad(sequences: list[torch.Tensor], pad_id: int | None) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    if all(len(s) == length for s in sequences):
        return torch.stack(sequences)
    out = torch.full((len(sequences), length), pad_id if pad_id is not None else 0, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out


# ---------------------------------------------------------------- drawing masked batches

def lm_loader(blocks, tokenizer, batch_size: int, mlm_probability: float, generator: torch.Generator,
                  shuffle: bool = True, drop_last: bool = False) -> DataLoader:
    """Batches of `blocks`, masked as they are drawn; one generator decides both the order and the masks, so
    the same seed gives the same batches. (Unshuffled, the loader itself is not given the generator: it would
    only draw its worker seed from it, and the masks would change.)"""
    blocks = blocks.with_format("torch")
    return DataLoader(blocks, batch_size=batch_size, sampler=BlockSampler(blocks, generator=generator) if shuffle
                      else None, drop_last=drop_last, generator=generator if shuffle else None,
                      collate_fn=MaskingCollator(tokenizer, mlm_probability, generator))


class BlockSampler(RandomSampler):
    """torch's `RandomSampler` (the same permutations from the same generator draws, so the same batches),
    handing out each permutation a slice at a time: the block order of a large corpus is one int64 tensor,
    never a Python list of millions of ints."""

    SLICE = 8192

    def __iter__(self) -> Iterator[int]:
        if self.replacement or self.generator is None:
            yield from super().__iter__()
            return
        n = len(self.data_source)
        for _ in range(self.num_samples // n):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, self.SLICE):
                yield from order[start:start + self.SLICE].tolist()
        yield from torch.randperm(n, generator=self.generator)[: self.num_samples % n].tolist()


class Interleaved:
    """The blocks of several corpora drawn in turn, one batch from each (an equal mixture whatever their sizes;
    a small corpus is cycled): one stage's data when it should not be one concatenated corpus. One generator
    draws every corpus's order and masks, as in `lm_loader`."""

    def __init__(self, parts: list):
        if not parts:
            raise ValueError("Interleaved needs at least one corpus")
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def batches(self, tokenizer, batch_size: int, mlm_probability: float, generator: torch.Generator,
                process_index: int = 0, num_processes: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches of `batch_size` rows per process: every process draws the same global batch (same
        generator) and keeps its own contiguous share of its rows, so n processes train on what one does."""
        rows = batch_size * num_processes
        loaders = [iter(endless(lm_loader(part, tokenizer, rows, mlm_probability, generator,
                                          drop_last=num_processes > 1 and len(part) >= rows)))
                   for part in self.parts]
        for step in itertools.count():
            batch = next(loaders[step % len(loaders)])
            if num_processes > 1:
                share = torch.arange(len(batch["input_ids"])).tensor_split(num_processes)[process_index]
                batch = {key: value[share] for key, value in batch.items()}
            yield batch


def stage_loader(blocks, tokenizer, batch_size: int, mlm_probability: float, generator: torch.Generator,
                 accelerator) -> Iterable[dict[str, torch.Tensor]]:
    """What the trainer draws a stage's batches from: `batch_size` rows per process. A corpus's blocks give a
    shuffled loader for `accelerator.prepare` to shard (the last short batch dropped when the corpus holds a
    whole one); `Interleaved` blocks share out their own batches (and `prepare` passes them through)."""
    if isinstance(blocks, Interleaved):
        return blocks.batches(tokenizer, batch_size, mlm_probability, generator, accelerator.process_index,
                              accelerator.num_processes)
    global_batch = batch_size * accelerator.num_processes
    return lm_loader(blocks, tokenizer, batch_size, mlm_probability, generator, drop_last=len(blocks) >= global_batch)


def endless(batches: Iterable) -> Iterator:
    """Iterate a loader again and again (a new order each pass): a small domain is cycled."""
    while True:
        yield from batches


def process_share(batches: Iterable, count: int, accelerator) -> Iterator:
    """This process's share of the first `count` batches: batch i goes to process i mod n. Every process draws
    the same batches (same generator), so n processes together see exactly what one process sees alone; the
    caller sums its per-process totals across processes."""
    for index, batch in enumerate(itertools.islice(batches, count)):
        if index % accelerator.num_processes == accelerator.process_index:
            yield batch


def masked_sample(blocks, tokenizer, batch_size: int, mlm_probability: float, batches: int,
                  generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """`batches` masked batches of distinct blocks drawn at random (fewer if the blocks run out), kept in
    memory: a fixed sample to score models on."""
    collate = MaskingCollator(tokenizer, mlm_probability, generator)
    order = torch.randperm(len(blocks), generator=generator)[: batches * batch_size]
    return [collate([blocks[int(i)] for i in order[start: start + batch_size]])
            for start in range(0, len(order), batch_size)]


masked_loader = renamed(lm_loader, "masked_loader")  # the encoder-era name (one release; README, "Words")
