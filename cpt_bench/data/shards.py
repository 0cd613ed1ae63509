"""A corpus tokenised once into a flat file of token ids on disk, read back through `np.memmap`, and the LM's
fixed-length blocks as views into it: training reads blocks from the file, and nothing holds a whole corpus in
memory (docs/suites.md, "Corpora larger than memory", says why a flat token file and not Arrow).

The file is the corpus's token stream: each text's ids (no special tokens) followed by one separator (an
encoder's [SEP], a decoder's end-of-text), uint16 when the vocabulary fits, else uint32. Several processes
tokenise at once, each a chunk of texts in turn, written in corpus order. The file is cached by the corpus's
content digest and the tokenizer, so every block length, run and method reads the same file."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from cpt_bench.common.cache import building, cache_dir
from cpt_bench.common.errors import BadInput
from cpt_bench.data.corpus import Corpus

CHUNK_TEXTS = 2048  # texts a worker tokenises per task: large enough to amortise the transfer
IN_PROCESS_CHUNKS = 8  # chunks tokenised before worker processes start (16,384 texts: about as long as a start)
POOL_FROM_CHUNKS = 64  # a corpus of fewer chunks (131,072 texts, ~50 MB of das6 text) is tokenised in-process:
# starting workers (each imports transformers) costs more than they would save on it
STREAM_VERSION = 1  # part of the cache key: bump with any change of what the file holds


def tokeniser_processes() -> int:
    """How many processes tokenise a large corpus: `CPT_BENCH_TOKENISE_PROCESSES`, else the cores this process
    may use."""
    configured = os.environ.get("CPT_BENCH_TOKENISE_PROCESSES")
    if configured:
        return max(1, int(configured))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TokenStream:
    """A corpus's token ids with a separator after each text, memory-mapped read-only."""

    def __init__(self, path: Path):
        meta = json.loads((path / "meta.json").read_text())
        self.path, self.tokens, self.texts = path, int(meta["tokens"]), int(meta["texts"])
        self.ids = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r", shape=(self.tokens,)) \
            if self.tokens else np.zeros(0, dtype=np.dtype(meta["dtype"]))

    def __len__(self) -> int:
        return self.tokens


def token_stream(corpus, tokenizer, separator: int, fingerprint: str, processes: int | None = None) -> TokenStream:
    """The token stream of `corpus` (a `data.corpus.Corpus` or a list of texts), built once and cached by
    content, tokenizer (`fingerprint`) and separator."""

    corpus = corpus if isinstance(corpus, Corpus) else Corpus.of(corpus, "texts")
    key = f"{corpus.digest[:16]}-{fingerprint}-sep{separator}-v{STREAM_VERSION}"
    path = cache_dir() / "tokens" / key
    if not (path / "meta.json").exists():
        with building(path) as tmp:
            processes = processes or tokeniser_processes()
            if len(corpus) < POOL_FROM_CHUNKS * CHUNK_TEXTS:
                processes = 1
            texts, tokens, dtype = _write_stream(corpus, tokenizer, separator, tmp / "tokens.bin", processes)
            (tmp / "meta.json").write_text(json.dumps({"tokens": tokens, "texts": texts, "dtype": dtype,
                                                       "separator": separator}))
    return TokenStream(path)


def _dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _write_stream(corpus, tokenizer, separator: int, target: Path, processes: int) -> tuple[int, int, str]:
    dtype = _dtype(tokenizer)
    counted = [0]  # texts read, counted as they stream past (no second pass over the corpus)

    def counting(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            counted[0] += 1
            yield text

    tokens = 0
    with target.open("wb") as out:
        for ids in _tokenised_chunks(_chunks(counting(corpus), CHUNK_TEXTS), tokenizer, separator, dtype,
                                     processes):
            out.write(ids.tobytes())
            tokens += len(ids)
    return counted[0], tokens, dtype.name


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenised_chunks(chunks: Iterator[list[str]], tokenizer, separator: int, dtype: np.dtype,
                      processes: int) -> Iterator[np.ndarray]:
    """Each chunk's token stream, in order. The first `IN_PROCESS_CHUNKS` chunks are tokenised here (starting
    worker processes costs a few seconds: more than a small corpus takes); what remains goes to a pool of
    `processes` worker processes with at most two chunks each in flight, so memory stays bounded whatever the
    corpus's size."""
    for chunk in itertools.islice(chunks, IN_PROCESS_CHUNKS if processes > 1 else None):
        yield _stream_of(tokenizer, chunk, separator, dtype)
    if processes <= 1:
        return
    rest = iter(chunks)
    first = next(rest, None)
    if first is None:
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_worker_init,
                                                initargs=(tokenizer, separator, dtype.str)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain([first], rest):
            pending.append(pool.submit(_worker_tokenise, chunk))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _stream_of(tokenizer, texts: list[str], separator: int, dtype: np.dtype) -> np.ndarray:
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    stream = np.full(int(lengths.sum()), separator, dtype=dtype)
    position = 0
    for ids, length in zip(encoded, lengths):
        stream[position:position + length - 1] = ids
        position += length
    return stream


_WORKER: dict = {}


def _worker_init(tokenizer, separator: int, dtype: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: the pool is the parallelism
    _WORKER.update(tokenizer=tokenizer, separator=separator, dtype=np.dtype(dtype))


def _worker_tokenise(texts: list[str]) -> np.ndarray:
    return _stream_of(_WORKER["tokenizer"], texts, _WORKER["separator"], _WORKER["dtype"])


# ---------------------------------------------------------------- blocks: views into a token stream

class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length LM blocks cut from a token stream, each read from the memory-mapped file when asked for.

    masked (encoder): block i = [CLS] + stream[i·b : i·b + b] + [SEP] with b = seq_len − 2, for every whole b;
    causal (decoder): block i reads stream[i·L : i·L + L] and predicts stream[i·L + 1 : i·L + L + 1], for
    every start i·L < len − L (every token but the stream's first is a target once; no padding).

    Indexed like a `datasets.Dataset`: `blocks[i]` is a dict of lists of ids (of int64 tensors after
    `with_format("torch")`, what the loaders read), `blocks["input_ids"]` a column, `select` a subset."""

    def __init__(self, stream: TokenStream, seq_len: int, causal: bool, cls: int | None = None,
                 sep: int | None = None, rows: np.ndarray | None = None, tensors: bool = False):
        self.stream, self.seq_len, self.causal, self.cls, self.sep = stream, seq_len, causal, cls, sep
        total = len(stream)
        if causal:
            count = (total - seq_len - 1) // seq_len + 1 if total > seq_len else 0
        else:
            body = seq_len - 2
            count = (total - body) // body + 1 if total >= body else 0
        self.count = count
        self.rows = rows  # a selection of block indices (`select`), or None for all
        self.tensors = tensors

    def __len__(self) -> int:
        return self.count if self.rows is None else len(self.rows)

    def __getitem__(self, index: int | str):
        if isinstance(index, str):  # a column, as a `datasets.Dataset` gives it
            return [self[i][index] for i in range(len(self))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        block = index if self.rows is None else int(self.rows[index])
        ids = self.stream.ids
        if self.causal:
            start = block * self.seq_len
            window = ids[start:start + self.seq_len + 1].astype(np.int64)
            return {"input_ids": self._out(window[:-1]), "labels": self._out(window[1:])}
        body = self.seq_len - 2
        middle = ids[block * body:(block + 1) * body].astype(np.int64)
        return {"input_ids": self._out(np.concatenate([[self.cls], middle, [self.sep]]))}

    def _out(self, values: np.ndarray):
        return torch.from_numpy(values) if self.tensors else values.tolist()

    def _copy(self, rows: np.ndarray | None, tensors: bool) -> TokenBlocks:
        return TokenBlocks(self.stream, self.seq_len, self.causal, self.cls, self.sep, rows, tensors)

    def select(self, indices: Iterable[int]) -> TokenBlocks:
        """The blocks at `indices` (in that order)."""
        chosen = np.fromiter((int(i) for i in indices), dtype=np.int64)
        return self._copy(chosen if self.rows is None else self.rows[chosen], self.tensors)

    def with_format(self, kind: str | None) -> TokenBlocks:
        """The same blocks as int64 tensors (`"torch"`) or as lists (None)."""
        if kind not in ("torch", None):
            raise ValueError(f"TokenBlocks.with_format: 'torch' or None, got {kind!r}")
        return self._copy(self.rows, kind == "torch")


class JoinedBlocks(torch.utils.data.ConcatDataset):
    """Several corpora's blocks as one (a joint stage's data), in order."""

    def with_format(self, kind: str | None) -> JoinedBlocks:
        return JoinedBlocks([part.with_format(kind) for part in self.datasets])


def corpus_blocks(corpus, tokenizer, seq_len: int, corpus_id: str, causal: bool, fingerprint: str) -> TokenBlocks:
    """The corpus as blocks for the LM's objective; one-line errors for a corpus with no text or too short for
    one block."""
    if causal:
        separator, cls, sep = tokenizer.eos_token_id, None, None
    else:
        separator, cls, sep = tokenizer.sep_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
    if separator is None:
        raise BadInput(f"corpus {corpus_id}: the tokenizer has no {'end-of-text' if causal else 'separator'} token")
    stream = token_stream(corpus, tokenizer, separator, fingerprint)
    if stream.texts == 0:
        raise BadInput(f"corpus {corpus_id} has no text left to make blocks of")
    blocks = TokenBlocks(stream, seq_len, causal, cls, sep)
    if len(blocks) == 0:
        raise BadInput(f"corpus {corpus_id} is shorter than one block of {seq_len} tokens")
    return blocks
