"""Language-model data: a corpus cut into fixed-length blocks (cached), BERT's masking for an encoder or the
next tokens as labels for a decoder, and the ways the trainer and the methods draw batches from a stage's
blocks: the one place that builds them. Either way a batch is (input_ids, attention_mask, labels) with -100
where nothing is scored, so one loss serves both kinds of LM (`cpt_bench.models.loading.lm_loss`)."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from cpt_bench.common.cache import building, cache_dir
from cpt_bench.common.deprecation import renamed
from cpt_bench.common.errors import BadInput


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()[:16]


def lm_blocks(texts: list[str], tokenizer, seq_len: int, corpus_id: str, causal: bool = False):
    """The corpus as fixed-length training blocks for the LM's objective (`causal`: next-token blocks)."""
    return causal_blocks(texts, tokenizer, seq_len, corpus_id) if causal else \
        mlm_blocks(texts, tokenizer, seq_len, corpus_id)


def mlm_blocks(texts: list[str], tokenizer, seq_len: int, corpus_id: str):
    """Concatenate the tokenised texts (separated by the separator token) and cut blocks of `seq_len` tokens.

    Every block is [CLS] + seq_len-2 tokens + [SEP], fixed length, so DAP batches carry no padding.
    Cached on disk per (corpus content, tokenizer, seq_len).
    """
    sep, cls, body = tokenizer.sep_token_id, tokenizer.cls_token_id, seq_len - 2

    def group(batch):
        stream: list[int] = []
        for ids in batch["ids"]:
            stream.extend(ids)
            stream.append(sep)
        return {"input_ids": [[cls, *stream[i:i + body], sep] for i in range(0, len(stream) - body + 1, body)]}

    return _cached_blocks(texts, tokenizer, seq_len, corpus_id, "mlm", group)


def causal_blocks(texts: list[str], tokenizer, seq_len: int, corpus_id: str):
    """A decoder's packed blocks: the tokenised texts joined by the end-of-text token, cut into `seq_len` inputs
    whose labels are the next `seq_len` tokens (block i reads stream[i·L : i·L+L] and predicts stream[i·L+1 :
    i·L+L+1], so every token but the stream's first is a target once). No padding: every label is a real token."""
    eos = tokenizer.eos_token_id

    def group(batch):
        stream: list[int] = []
        for ids in batch["ids"]:
            stream.extend(ids)
            stream.append(eos)
        starts = range(0, len(stream) - seq_len, seq_len)
        return {"input_ids": [stream[i:i + seq_len] for i in starts],
                "labels": [stream[i + 1:i + seq_len + 1] for i in starts]}

    return _cached_blocks(texts, tokenizer, seq_len, corpus_id, "causal", group)


def _cached_blocks(texts: list[str], tokenizer, seq_len: int, corpus_id: str, kind: str, group):
    """Tokenise (no special tokens), `group` the whole corpus into blocks, cache on disk per (content, tokenizer,
    seq_len, kind)."""
    import datasets
    from datasets.table import InMemoryTable

    if not texts:  # e.g. a corpus whose every text is also one of its held-out texts
        raise BadInput(f"corpus {corpus_id} has no text left to make blocks of")
    content = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
    key = f"{content}-{tokenizer_fingerprint(tokenizer)}-{seq_len}" + ("" if kind == "mlm" else f"-{kind}")
    path = cache_dir() / "blocks" / key
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))

    def tokenize(batch):
        return {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

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
    return DataLoader(blocks.with_format("torch"), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=generator if shuffle else None,
                      collate_fn=MaskingCollator(tokenizer, mlm_probability, generator))


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
