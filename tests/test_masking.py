"""BERT-style masking (MaskingCollator) and fixed-length MLM blocks (mlm_blocks)."""

from __future__ import annotations

import random

import pytest
import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.data.batches import MaskingCollator, mlm_blocks
from cpt_bench.running.synthetic import build_tokenizer

VOCABULARY = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(VOCABULARY, 512)


def _word_ids(tokenizer) -> tuple[int, int]:
    """[low, high) range of the ordinary (non-special) token ids."""
    ids = tokenizer.convert_tokens_to_ids(VOCABULARY)
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert ids == list(range(min(ids), max(ids) + 1))
    return min(ids), max(ids) + 1


def _random_batch(tokenizer, rows: int, length: int, seed: int = 0) -> list[dict]:
    low, high = _word_ids(tokenizer)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (rows, length), generator=g)
    return [{"input_ids": row.tolist()} for row in ids]


def _collate(tokenizer, examples, seed=1234, probability=0.15):
    collator = MaskingCollator(tokenizer, probability=probability, generator=torch.Generator().manual_seed(seed))
    return collator(examples)


# ---------------------------------------------------------------- rates


@pytest.fixture(scope="module")
def big_batch(tokenizer):
    examples = _random_batch(tokenizer, 256, 128)
    original = torch.tensor([e["input_ids"] for e in examples])
    return original, _collate(tokenizer, examples)


def test_about_15_percent_of_tokens_are_chosen(big_batch):
    _, out = big_batch
    chosen = out["labels"] != -100
    rate = chosen.float().mean().item()
    assert 0.13 <= rate <= 0.17, rate


def test_custom_probability_is_honoured(tokenizer):
    examples = _random_batch(tokenizer, 128, 128, seed=3)
    out = _collate(tokenizer, examples, probability=0.4)
    rate = (out["labels"] != -100).float().mean().item()
    assert 0.37 <= rate <= 0.43, rate


def test_labels_are_original_ids_where_chosen_and_minus_100_elsewhere(big_batch):
    original, out = big_batch
    labels = out["labels"]
    assert labels.shape == original.shape
    chosen = labels != -100
    assert torch.equal(labels[chosen], original[chosen])
    assert set(labels[~chosen].unique().tolist()) == {-100}
    # a position that is not chosen keeps its token
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])


def test_80_10_10_split_of_chosen_positions(tokenizer, big_batch):
    original, out = big_batch
    inputs = out["input_ids"]
    chosen = out["labels"] != -100
    n = chosen.sum().item()
    assert n > 3000  # enough positions for the tolerances below
    masked = (chosen & (inputs == tokenizer.mask_token_id)).sum().item() / n
    unchanged = (chosen & (inputs == original)).sum().item() / n
    replaced = (chosen & (inputs != original) & (inputs != tokenizer.mask_token_id)).sum().item() / n
    assert 0.76 <= masked <= 0.84, masked
    assert 0.07 <= unchanged <= 0.13, unchanged
    assert 0.07 <= replaced <= 0.13, replaced
    # replacement tokens are valid ids of the vocabulary
    assert inputs.min().item() >= 0 and inputs.max().item() < len(tokenizer)
    # and really random: many different ids, not one fixed token
    replaced_ids = inputs[chosen & (inputs != original) & (inputs != tokenizer.mask_token_id)]
    assert len(replaced_ids.unique()) > 20


# ---------------------------------------------------------------- padding and special tokens


def _framed_examples(tokenizer, lengths: list[int], seed: int = 0) -> list[dict]:
    """[CLS] words [SEP] of different lengths (so the batch needs padding)."""
    low, high = _word_ids(tokenizer)
    rng = random.Random(seed)
    return [{"input_ids": [tokenizer.cls_token_id] + [rng.randrange(low, high) for _ in range(n)]
             + [tokenizer.sep_token_id]} for n in lengths]


@pytest.mark.parametrize("probability", [0.15, 1.0])
def test_padding_and_special_tokens_are_never_chosen(tokenizer, probability):
    lengths = [3, 40, 17, 1, 40, 25, 8, 33] * 8
    examples = _framed_examples(tokenizer, lengths)
    out = _collate(tokenizer, examples, probability=probability)
    inputs, labels, attention = out["input_ids"], out["labels"], out["attention_mask"]
    width = max(lengths) + 2
    assert inputs.shape == labels.shape == attention.shape == (len(lengths), width)
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        n = len(ids)
        # specials at both ends, padding after: unchanged, unlabelled
        for position in (0, n - 1):
            assert inputs[row, position].item() == ids[position]
            assert labels[row, position].item() == -100
        assert (inputs[row, n:] == tokenizer.pad_token_id).all()
        assert (labels[row, n:] == -100).all()
        # attention: 1 on the example, 0 on padding
        assert attention[row, :n].tolist() == [1] * n
        assert attention[row, n:].tolist() == [0] * (width - n)
    if probability == 1.0:
        # every ordinary token is chosen: the rule excludes exactly the specials and the padding
        ordinary = torch.zeros_like(labels, dtype=torch.bool)
        for row, n in enumerate(lengths):
            ordinary[row, 1: n + 1] = True
        assert torch.equal(labels != -100, ordinary)


def test_special_tokens_inside_a_sequence_are_never_chosen(tokenizer):
    # pairs: [CLS] a [SEP] b [SEP]; also [UNK] and [MASK] already in the text
    low, _ = _word_ids(tokenizer)
    specials = set(tokenizer.all_special_ids)
    row = [tokenizer.cls_token_id, low, low + 1, tokenizer.sep_token_id, tokenizer.unk_token_id, low + 2,
           tokenizer.mask_token_id, low + 3, tokenizer.sep_token_id]
    out = _collate(tokenizer, [{"input_ids": row}] * 64, probability=1.0)
    for position, token in enumerate(row):
        column_labels = out["labels"][:, position]
        if token in specials:
            assert (column_labels == -100).all(), position
            assert (out["input_ids"][:, position] == token).all(), position
        else:
            assert (column_labels == token).all(), position


def test_equal_length_batch_has_full_attention(tokenizer):
    examples = _framed_examples(tokenizer, [10, 10, 10])
    out = _collate(tokenizer, examples)
    assert out["attention_mask"].shape == (3, 12)
    assert (out["attention_mask"] == 1).all()


def test_examples_are_not_modified(tokenizer):
    examples = [{"input_ids": torch.tensor(e["input_ids"])} for e in _framed_examples(tokenizer, [30, 30])]
    before = [e["input_ids"].clone() for e in examples]
    _collate(tokenizer, examples, probability=1.0)
    for e, b in zip(examples, before):
        assert torch.equal(e["input_ids"], b)


# ---------------------------------------------------------------- determinism


def test_same_generator_seed_gives_identical_output(tokenizer):
    examples = _framed_examples(tokenizer, [5, 30, 12, 30] * 4)
    torch.manual_seed(1)
    first = _collate(tokenizer, examples, seed=7)
    torch.manual_seed(2)  # the global RNG must not matter when a generator is given
    second = _collate(tokenizer, examples, seed=7)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(first[key], second[key]), key
    other = _collate(tokenizer, examples, seed=8)
    assert not torch.equal(first["labels"], other["labels"])


# ---------------------------------------------------------------- MLM blocks


def _texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def _stream(tokenizer, texts: list[str]) -> list[int]:
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.sep_token_id)
    return stream


@pytest.mark.parametrize("seq_len", [8, 16, 33])
def test_mlm_blocks_are_fixed_length_framed_slices_of_the_token_stream(tokenizer, tmp_path, monkeypatch,
                                                                        seq_len):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    texts = _texts(80)
    blocks = [list(b) for b in mlm_blocks(texts, tokenizer, seq_len, "test-corpus")["input_ids"]]
    stream = _stream(tokenizer, texts)
    body = seq_len - 2
    assert len(blocks) == len(stream) // body  # only the final incomplete block is dropped
    for block in blocks:
        assert len(block) == seq_len
        assert block[0] == tokenizer.cls_token_id
        assert block[-1] == tokenizer.sep_token_id
    bodies = [t for block in blocks for t in block[1:-1]]
    assert bodies == stream[: len(bodies)]
    assert len(stream) - len(bodies) < body


def test_mlm_blocks_keep_the_last_block_when_the_stream_divides_exactly(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    texts = [" ".join(VOCABULARY[i: i + 3]) for i in range(10)]  # 10 x (3 words + sep) = 40 tokens
    blocks = [list(b) for b in mlm_blocks(texts, tokenizer, 10, "exact")["input_ids"]]  # body 8
    assert len(blocks) == 5
    assert [t for b in blocks for t in b[1:-1]] == _stream(tokenizer, texts)


def test_the_token_file_is_cached_by_content_and_serves_every_block_length(tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CPT_BENCH_CACHE", str(cache))
    texts = _texts(60, seed=1)
    first = mlm_blocks(texts, tokenizer, 16, "c")["input_ids"]
    assert len(list(cache.glob("tokens/*/meta.json"))) == 1
    again = mlm_blocks(texts, tokenizer, 16, "c")["input_ids"]
    assert [list(b) for b in again] == [list(b) for b in first]
    # another block length is cut from the same token file; other texts get their own
    assert {len(b) for b in mlm_blocks(texts, tokenizer, 10, "c")["input_ids"]} == {10}
    assert len(list(cache.glob("tokens/*/meta.json"))) == 1
    other = _texts(60, seed=2)
    other_bodies = [t for b in mlm_blocks(other, tokenizer, 16, "c")["input_ids"] for t in list(b)[1:-1]]
    assert other_bodies == _stream(tokenizer, other)[: len(other_bodies)]
    assert len(list(cache.glob("tokens/*/meta.json"))) == 2


def test_mlm_blocks_corpus_shorter_than_one_block_is_bad_input(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BadInput, match="shorter than one block"):
        mlm_blocks(["w1 w2", "w3"], tokenizer, 32, "tiny-corpus")
