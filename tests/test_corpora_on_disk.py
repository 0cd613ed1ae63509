"""Corpora larger than memory (docs/suites.md, "Corpora larger than memory"): a corpus is streamed from its
file, tokenised once into a token file read through np.memmap, and its blocks are views into that file. The
streamed corpus reads exactly what reading the file whole read; worker processes tokenise to the same file as
one process; a run's memory does not grow with its corpus."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.data import shards
from cpt_bench.data.batches import BlockSampler, lm_blocks, tokenizer_fingerprint
from cpt_bench.data.corpus import Corpus, file_records, json_digest
from cpt_bench.data.texts import read_corpus

from conftest import write_jsonl


def test_a_streamed_txt_corpus_splits_lines_as_reading_it_whole_did(tmp_path):
    # a form feed, U+2028 and a CRLF: str.splitlines on the whole text (the old reader) splits at each
    text = "one line\r\ntwo\x0cthree\nfour\u2028five\n\n   \nsix"
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    corpus, _ = read_corpus(str(path), "text", None, None)
    assert list(corpus) == [line for line in text.splitlines() if line.strip()]
    assert len(corpus) == 6


def test_bad_lines_of_a_streamed_corpus_are_one_line_errors_with_their_line_number(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n')
    with pytest.raises(BadInput, match="line 4: malformed JSON"):
        read_corpus(str(path), "text", None, None)
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInput, match="line 2: not UTF-8"):
        read_corpus(str(path), "text", None, None)
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(BadInput, match="line 2: missing field 'text'"):
        read_corpus(str(path), "text", None, None)
    path.write_text("\n  \n")
    with pytest.raises(BadInput, match="empty corpus"):
        read_corpus(str(path), "text", None, None)


def test_a_view_and_its_digest_are_those_of_the_list_it_stands_for(tmp_path):
    texts = [f"text number {i} with \"quotes\" and é" for i in range(50)] + ["repeated"] * 3
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, [{"text": t} for t in texts])
    corpus = Corpus(lambda: file_records(path), "text", str(path), limit=45)
    assert list(corpus) == texts[:45] and len(corpus) == 45
    assert corpus.digest == hashlib.sha256(json.dumps(texts[:45]).encode()).hexdigest()
    view = corpus.view(5, 40, excluded=frozenset({texts[7]}), dropped=frozenset({10, 11}))
    expected = [t for i, t in enumerate(texts[5:40], start=5) if i not in (10, 11) and t != texts[7]]
    assert list(view) == expected and len(view) == len(expected)
    assert corpus.texts(40, 45) == texts[40:45]
    nested = [["a", "b"], corpus, {"k": [1, corpus]}]
    assert json_digest(nested) == hashlib.sha256(json.dumps([["a", "b"], texts[:45], {"k": [1, texts[:45]]}])
                                                 .encode()).hexdigest()


def _reference_stream(tokenizer, texts, separator):
    stream = []
    for text in texts:
        stream += [*tokenizer(text, add_special_tokens=False)["input_ids"], separator]
    return stream


def test_worker_processes_tokenise_to_the_same_file_as_one_process(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shards, "CHUNK_TEXTS", 7)  # many chunks of a small corpus...
    monkeypatch.setattr(shards, "IN_PROCESS_CHUNKS", 2)  # ...most of them sent to the two workers
    monkeypatch.setattr(shards, "POOL_FROM_CHUNKS", 3)  # (a corpus this small is otherwise tokenised in-process)
    tokenizer = tiny_lm.tokenizer
    texts = [f"the cats was {['purr', 'nap', 'soft', 'calm'][i % 4]} and {i % 3} ." for i in range(60)]
    separator = tokenizer.sep_token_id
    pooled = shards.token_stream(texts, tokenizer, separator, "fp", processes=2)
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "other-cache"))
    alone = shards.token_stream(texts, tokenizer, separator, "fp", processes=1)
    assert pooled.path != alone.path and pooled.texts == alone.texts == 60
    assert np.array_equal(np.asarray(pooled.ids), np.asarray(alone.ids))
    assert np.asarray(alone.ids).tolist() == _reference_stream(tokenizer, texts, separator)


def test_blocks_are_read_from_the_token_file_on_disk(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    tokenizer = tiny_lm.tokenizer
    texts = ["the cats was purr and nap ."] * 40
    blocks = lm_blocks(texts, tokenizer, 16, "cats")
    (token_file,) = (tmp_path / "cache" / "tokens").glob("*/tokens.bin")
    assert isinstance(blocks.stream.ids, np.memmap) and str(blocks.stream.ids.filename) == str(token_file.resolve())
    assert token_file.stat().st_size == blocks.stream.tokens * np.dtype(np.uint16).itemsize  # a small vocabulary
    stream = _reference_stream(tokenizer, texts, tokenizer.sep_token_id)
    assert blocks[1]["input_ids"] == [tokenizer.cls_token_id, *stream[14:28], tokenizer.sep_token_id]
    assert torch.equal(blocks.with_format("torch")[1]["input_ids"], torch.tensor(blocks[1]["input_ids"]))
    assert [b["input_ids"] for b in blocks.select([3, 1])] == [blocks[3]["input_ids"], blocks[1]["input_ids"]]
    assert tokenizer_fingerprint(tokenizer) in token_file.parent.name


def test_the_block_sampler_draws_what_torchs_random_sampler_draws():
    data = list(range(20_000))  # more than one slice
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert list(BlockSampler(data, generator=ours)) == list(torch.utils.data.RandomSampler(data, generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())  # the same draws: masks drawn after match too


# VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's peak across fork and exec)
_PEAK = textwrap.dedent("""
    import json, re, sys
    from cpt_bench.running.plan import RunRequest, plan_run
    plan = plan_run(RunRequest("naive", sys.argv[1], show_progress=False))
    blocks = plan.blocks("cats")
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    print(json.dumps({"blocks": len(blocks), "peak_kib": peak}))
""")


def test_planning_a_run_does_not_hold_its_corpus_in_memory(tiny_suite, tmp_path):
    """The same plan over a corpus of 1 MB and of 32 MB: planning reads, audits, holds out and tokenises the
    corpus, and its peak memory may not grow by more than a fraction of the larger corpus (holding the texts,
    as before, took more than the corpus's size)."""
    import os

    corpus = tiny_suite.parent / "data" / "cats" / "unlabeled.jsonl"
    line = json.dumps({"text": " ".join(["the cats was purr and nap ."] * 8)}) + "\n"
    peaks = {}
    for megabytes in (1, 32):
        corpus.write_text(line * (megabytes * 2 ** 20 // len(line)))
        env = {**os.environ, "CPT_BENCH_CACHE": str(tmp_path / f"cache-{megabytes}"), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _PEAK, str(tiny_suite)], capture_output=True, text=True,
                             env=env, check=True)
        peaks[megabytes] = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks[32]["blocks"] > 25 * peaks[1]["blocks"]
    grown_mib = (peaks[32]["peak_kib"] - peaks[1]["peak_kib"]) / 1024
    assert grown_mib < 16, peaks  # of a 32 MB corpus (its texts in a list took about 40 MB more)


def test_a_budget_in_tokens_becomes_whole_steps_and_the_result_counts_the_tokens(tiny_suite, tmp_path):
    from conftest import assert_one_line_error, run_cli

    out = tmp_path / "runs"
    # the tiny suite: 4 blocks of 16 tokens a step, so 300 tokens are 5 steps (320 tokens) per stage
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(out), "--quiet",
                     "--eval", "final", "--set", "dap.tokens=300")
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["settings"]["dap"]["tokens"] == 300 and saved["settings"]["dap"]["steps"] == 5
    assert [stage["steps"] for stage in saved["stages"]] == [5, 5]
    assert [stage["tokens"] for stage in saved["stages"]] == [320, 320]
    both = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path / "x"),
                   "--steps", "3", "--set", "dap.tokens=300")
    assert_one_line_error(both, "dap.tokens or --steps")
    negative = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path / "x"),
                       "--set", "dap.tokens=-5")
    assert_one_line_error(negative, "dap.tokens")
