"""Masked-LM data: a corpus cut into fixed-length blocks (cached), BERT's masking, and the ways the trainer
and the methods draw masked batches from a stage's blocks: the one place that builds them."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from cpt_bench.cache import building, cache_dir
from cpt_bench.errors import BadInput


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()[:16]


def mlm_blocks(texts: list[str], tokenizer, seq_len: int, corpus_id: str):
    """Concatenate the tokenised texts (separated by the separator token) and cut blocks of `seq_len` tokens.

    Every block is [CLS] + seq_len-2 tokens + [SEP], fixed length, so DAP batches carry no padding.
    Cached on disk per (corpus content, tokenizer, seq_len).
    """
    import datasets
    from datasets.table import InMemoryTable

    content = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    key = f"{content}-{tokenizer_fingerprint(tokenizer)}-{seq_len}"
    path = cache_dir() / "blocks" / key
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    body = seq_len - 2
    sep = tokenizer.sep_token_id
    cls = tokenizer.cls_token_id

    def tokenize(batch):
        return {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    def group(batch):
        stream: list[int] = []
        for ids in batch["ids"]:
            stream.extend(ids)
            stream.append(sep)
        blocks = [[cls, *stream[i:i + body], sep] for i in range(0, len(stream) - body + 1, body)]
        return {"input_ids": blocks}

    # fingerprints from our own key: datasets would otherwise pickle the table and the tokenizer to hash them,
    # which fails on some Python/pyarrow/dill combinations (seen with Python 3.12) and costs time anyway
    dataset = datasets.Dataset(InMemoryTable.from_pydict({"text": texts}), fingerprint=f"{key}-text")
    dataset = dataset.map(tokenize, batched=True, remove_columns=["text"], desc=f"tokenising {corpus_id}",
                          new_fingerprint=f"{key}-ids")
    # one group over all rows so no text is cut at a batch boundary more than once per block
    dataset = dataset.map(group, batched=True, batch_size=len(dataset), remove_columns=["ids"],
                          new_fingerprint=f"{key}-blocks")
    if len(dataset) == 0:
        raise BadInput(f"corpus {corpus_id} is shorter than one block of {seq_len} tokens")
    with building(path) as tmp:
        dataset.save_to_disk(str(tmp))
    return datasets.load_from_disk(str(path))


class MaskingCollator:
    """BERT's masking: choose `probability` of the non-special, non-padding tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Labels are -100 everywhere else."""

    def __init__(self, tokenizer, probability: float = 0.15, generator: torch.Generator | None = None):
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.pad_id = tokenizer.pad_token_id
        self.probability = probability
        self.generator = generator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = _pad([torch.as_tensor(e["input_ids"]) for e in examples], self.pad_id)
        attention_mask = (input_ids != self.pad_id).long() if self.pad_id is not None else \
            torch.ones_like(input_ids)
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

def masked_loader(blocks, tokenizer, batch_size: int, mlm_probability: float, generator: torch.Generator,
                  shuffle: bool = True, drop_last: bool = False) -> DataLoader:
    """Batches of `blocks`, masked as they are drawn; one generator decides both the order and the masks, so
    the same seed gives the same batches. (Unshuffled, the loader itself is not given the generator: it would
    only draw its worker seed from it, and the masks would change.)"""
    return DataLoader(blocks.with_format("torch"), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=generator if shuffle else None,
                      collate_fn=MaskingCollator(tokenizer, mlm_probability, generator))


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
