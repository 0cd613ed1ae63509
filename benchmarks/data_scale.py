"""Corpora larger than memory, measured (docs/suites.md, "Corpora larger than memory"; results/perf/data-scale.md).

    python benchmarks/data_scale.py --data-dir ../shared/data/das6-mini --sizes 10,100,1000 \
        --work /tmp/data-scale --output results/perf/data-scale.md

For each size S (MB) it writes a corpus of S MB of real text (texts drawn at random, with replacement, seed 0,
from das6-mini's restaurant, acl and pubmed corpora: real sentences, repeated as often as the size needs) and
measures, each in a fresh process on a fresh cache:

- tokenisation: `data.shards.token_stream` (the corpus streamed from its file, worker processes, written to
  the token file) against the raw fast tokenizer called in batches of 2,048 on the same texts held in memory,
  with its own Rust threads on the same cores (`TOKENIZERS_PARALLELISM=true`): both wall times and the ratio;
- the contamination audit streaming the corpus against das6-lite's restaurant end task: seconds per GB;
- a naive run of one stage (MiniLM, 20 DAP steps of 16 × 128, linear probe on 300 restaurant examples): wall
  time and peak resident memory (the child's VmHWM), planning and tokenising included.

Only the benchmark's own parent process writes the corpus (streamed to disk), so no measured process ever
holds it."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SUITE = """\
name: data-scale
description: "one domain of generated size (benchmarks/data_scale.py): MiniLM, 20 DAP steps, linear probe"
model: minilm
domains:
  - name: scale
    corpus: {corpus}
    end_task:
      train: {data}/restaurant/train.jsonl
      test: {data}/restaurant/test.jsonl
      text_pair_field: aspect
      labels: [negative, neutral, positive]
      evaluator: probe
      subsample: {{train: 300, test: 300}}
perplexity:
  blocks: 8
  heldout_texts: 200
dap:
  steps: 20
  batch_size: 16
  seq_len: 128
  lr: 1.0e-4
finetune:
  max_length: 128
  batch_size: 64
"""

TOKENISE = textwrap.dedent("""
    import json, os, sys, time
    if __name__ == "__main__":
        from transformers import AutoTokenizer
        from cpt_bench.data import shards
        from cpt_bench.data.batches import tokenizer_fingerprint
        from cpt_bench.data.texts import read_corpus
        from cpt_bench.models.loading import minilm_dir
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        corpus, _ = read_corpus(sys.argv[1], "text", None, None)
        started = time.perf_counter()
        stream = shards.token_stream(corpus, tokenizer, tokenizer.sep_token_id, tokenizer_fingerprint(tokenizer))
        ours = time.perf_counter() - started
        texts = list(corpus)  # the raw tokenizer's texts, in memory (it has no streaming of its own)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        started = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), 2048):
            encoded = tokenizer(texts[i:i + 2048], add_special_tokens=False, return_attention_mask=False,
                                return_token_type_ids=False)["input_ids"]
            tokens += sum(len(ids) + 1 for ids in encoded)
        raw = time.perf_counter() - started
        assert tokens == stream.tokens, (tokens, stream.tokens)
        print(json.dumps({"texts": stream.texts, "tokens": stream.tokens, "ours_s": ours, "raw_s": raw}))
""")

AUDIT = textwrap.dedent("""
    import json, sys, time
    from cpt_bench.data.audit import audit
    from cpt_bench.data.texts import read_corpus, read_file_records
    corpus, _ = read_corpus(sys.argv[1], "text", None, None)
    tests = [row["text"] for row in read_file_records(__import__("pathlib").Path(sys.argv[2]))]
    started = time.perf_counter()
    rows = audit({"scale": corpus}, {("restaurant", "test"): tests})
    print(json.dumps({"seconds": time.perf_counter() - started, "overlapping": rows[0].overlapping}))
""")


def write_corpus(path: Path, megabytes: int, data_dir: Path) -> int:
    """`megabytes` MB of texts drawn at random (seed 0) from das6-mini's corpora; returns the texts written.
    The sources are read once into this process (about 40 MB); the corpus is streamed to disk."""
    sources = []
    for domain in ("restaurant", "acl", "pubmed"):
        with (data_dir / domain / "unlabeled.jsonl").open(encoding="utf-8") as handle:
            sources += [line for line in handle if line.strip()]
    rng, written, count = random.Random(0), 0, 0
    with path.open("w", encoding="utf-8") as out:
        while written < megabytes * 1_000_000:
            line = rng.choice(sources)
            out.write(line if line.endswith("\n") else line + "\n")
            written += len(line.encode("utf-8"))
            count += 1
    return count


def child(command: list[str], env: dict[str, str]) -> tuple[dict, float, float]:
    """Run a child process; (its last JSON stdout line or {}, wall seconds, peak resident MiB). The peak is the
    child's own VmHWM, read while it runs (`ru_maxrss` would carry a parent's peak across fork and exec)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        peak_kib = 0
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                pass  # between exec and exit
            time.sleep(0.2)
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), wall, peak_kib / 1024


def measure(megabytes: int, data_dir: Path, work: Path) -> dict:
    folder = work / f"{megabytes}mb"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "scale").mkdir(parents=True)
    corpus = folder / "scale" / "unlabeled.jsonl"
    texts = write_corpus(corpus, megabytes, data_dir)
    suite = folder / "suite.yaml"
    suite.write_text(SUITE.format(corpus=corpus, data=data_dir.resolve()))
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    row = {"megabytes": megabytes, "bytes": corpus.stat().st_size, "texts": texts}
    tokenised, _, _ = child([sys.executable, "-c", TOKENISE, str(corpus)],
                            {**base_env, "CPT_BENCH_CACHE": tempfile.mkdtemp(dir=work)})
    row.update(tokens=tokenised["tokens"], tokenise_s=tokenised["ours_s"], raw_tokenizer_s=tokenised["raw_s"])
    audited, _, _ = child([sys.executable, "-c", AUDIT, str(corpus), str(data_dir / "restaurant" / "test.jsonl")],
                          base_env)
    row["audit_s_per_gb"] = audited["seconds"] / (row["bytes"] / 1e9)
    output = folder / "runs"
    cache = tempfile.mkdtemp(dir=work)
    _, wall, peak = child(["cpt-bench", "run", "--method", "naive", "--suite", str(suite), "--eval", "final",
                           "--output", str(output), "--quiet"], {**base_env, "CPT_BENCH_CACHE": cache})
    (result_file,) = output.glob("*.json")
    result = json.loads(result_file.read_text())
    row.update(run_wall_s=wall, run_peak_mib=peak, dap_s=result["stages"][0]["seconds"],
               device=result["provenance"]["device"])
    shutil.rmtree(cache, ignore_errors=True)
    return row


def table(rows: list[dict], command: str) -> str:
    smallest = rows[0]
    lines = [f"`{command}`", "",
             "| corpus | texts | tokens | tokenise (ours) | raw tokenizer | our speed / raw's | audit s/GB | "
             "naive run wall | of it DAP | peak RSS | peak / smallest's |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['bytes'] / 1e6:,.0f} MB | {row['texts']:,} | {row['tokens']:,} | "
                     f"{row['tokenise_s']:.1f} s | {row['raw_tokenizer_s']:.1f} s | "
                     f"{row['raw_tokenizer_s'] / row['tokenise_s']:.2f} | {row['audit_s_per_gb']:.0f} | "
                     f"{row['run_wall_s']:.0f} s | {row['dap_s']:.0f} s | {row['run_peak_mib']:,.0f} MiB | "
                     f"{row['run_peak_mib'] / smallest['run_peak_mib']:.3f} |")
    lines += ["", f"Device: {rows[0]['device']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="das6-mini (restaurant, acl, pubmed)")
    parser.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, smallest first")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cpt-bench-data-scale")
    parser.add_argument("--output", type=Path, help="the Markdown table (and a .json beside it)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        rows.append(measure(size, args.data_dir, args.work))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.output:
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
