"""DAP throughput and model-FLOPs utilisation on one GPU, bf16: `naive` and `softmask` steps of our trainer on a
randomly initialised roberta-base-sized masked LM (no download), alongside `transformers.Trainer`.

    python benchmarks/gpu_throughput.py [--batch-size 64] [--seq-len 512] [--steps 20] [--repeats 2]
                                        [--peak-tflops 989] [--variant KIND ...] [--output results/perf/gpu.md]

Kinds: transformers.Trainer, our naive and softmask steps (softmask at a later stage: masking and the
contrastive loss on), plus the variants (default: softmask with `contrastive_views=mlm_anchor`, and naive with
`dap.compile=true`).

MFU = 6 · N · tokens/s / peak, N = parameters without the embeddings (the usual convention), peak = the card's
dense bf16 tensor throughput (H100/H200 SXM: 989 TFLOP/s; pass --peak-tflops for another card). One command,
a few minutes; `--tiny --device cpu` is a smoke test of the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


DEFAULT_VARIANTS = ["softmask:softmask.contrastive_views=mlm_anchor", "naive:dap.compile=true"]


def build_model(folder: Path, tiny: bool) -> int:
    """A roberta-base-sized (or tiny) RobertaForMaskedLM with random weights and a local tokenizer; returns N."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from cpt_bench.synthetic import build_tokenizer

    words = [f"w{i}" for i in range(5000)]
    tokenizer = build_tokenizer(words, 514)
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id, **size)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return sum(p.numel() for p in model.parameters()) - embeddings


def write_suite(folder: Path, model_dir: Path, batch_size: int, seq_len: int, precision: str) -> Path:
    """A one-domain suite of random word text (throughput does not depend on the words)."""
    import random

    rng = random.Random(0)
    data = folder / "data"
    (data / "d").mkdir(parents=True)
    lines = [json.dumps({"text": " ".join(f"w{rng.randrange(5000)}" for _ in range(60))}) for _ in range(4000)]
    (data / "d" / "unlabeled.jsonl").write_text("\n".join(lines) + "\n")
    task = [json.dumps({"text": "w1 w2", "label": label}) for label in ("a", "b") * 4]
    for split in ("train", "test"):
        (data / "d" / f"{split}.jsonl").write_text("\n".join(task) + "\n")
    suite = {"name": "gpu-throughput", "description": "random text for throughput", "model": str(model_dir),
             "data_dir": "data", "perplexity": {"blocks": 0},
             "domains": [{"name": "d", "corpus": "d/unlabeled.jsonl",
                          "end_task": {"train": "d/train.jsonl", "test": "d/test.jsonl", "labels": ["a", "b"]}}],
             "dap": {"steps": 1000, "batch_size": batch_size, "seq_len": seq_len, "lr": 1e-4,
                     "precision": precision}}
    path = folder / "suite.json"
    path.write_text(json.dumps(suite))
    yaml_path = folder / "suite.yaml"
    yaml_path.write_text(path.read_text())  # JSON is YAML
    return yaml_path


def profile_kinds(kinds: list[str], suite: str, args) -> None:
    """Each kind's steps under torch.profiler, in a process of its own: the top operators by GPU time."""
    import subprocess

    from cpt_bench.bench import WARMUP_STEPS, BenchRequest

    request = BenchRequest(suite=suite, steps=args.steps, repeats=1, device=args.device, profile=True)
    report = []
    for kind in kinds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = Path(handle.name)
        subprocess.run([sys.executable, "-m", "cpt_bench.bench", kind, str(out),
                        json.dumps(dataclasses.asdict(request))], check=True)
        measured = json.loads(out.read_text())
        kernels = measured.get("device_kernel_seconds")
        steps = args.steps + WARMUP_STEPS  # the profile spans the warm-up steps too
        median_ms = statistics.median(measured["step_seconds"]) * 1000
        kernel_line = "" if kernels is None else \
            f"; GPU kernel time {kernels / steps * 1000:.1f} ms per step (all kernels of the stage / {steps} steps)"
        report.append(f"## {kind}\n\nmedian step {median_ms:.1f} ms under the profiler{kernel_line}\n\n"
                      f"```\n{measured['profile']}\n```\n")
    text = "\n".join(report)
    print(text, flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(f"{text}\nCommand: `python {' '.join(sys.argv)}`\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: smoke-test the script on a CPU")
    parser.add_argument("--variant", action="append", default=None,
                        help="extra kind METHOD:block.key=value,... (repeatable; replaces the default variants)")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--profile", nargs="*", default=None, metavar="KIND",
                        help="instead of timing: profile these kinds (default naive, softmask) with torch.profiler")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cpt_bench.bench import BenchRequest, run_bench, table

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n = build_model(folder / "model", args.tiny)
        precision = "bf16" if args.device == "cuda" else "no"
        suite = write_suite(folder, folder / "model", args.batch_size, args.seq_len, precision)
        os.environ.setdefault("CPT_BENCH_CACHE", str(folder / "cache"))
        if args.profile is not None:
            profile_kinds(args.profile or ["naive", "softmask"], str(suite), args)
            return
        variants = args.variant if args.variant is not None else DEFAULT_VARIANTS
        request = BenchRequest(suite=str(suite), steps=args.steps, repeats=args.repeats, device=args.device,
                               variants=variants)
        result = run_bench(request, echo=lambda line: print(line, flush=True))
    lines = [table(result), ""]
    result["mfu"] = {}
    for kind in result["kinds"]:
        tokens_per_second = result["tokens_per_second"][kind]
        result["mfu"][kind] = mfu = 6 * n * tokens_per_second / (args.peak_tflops * 1e12)
        lines.append(f"{kind:48s} {tokens_per_second:10.0f} tokens/s   MFU {mfu:.1%}")
    lines.append(f"MFU = 6 N tokens/s / peak, N = {n / 1e6:.1f} M non-embedding parameters, peak "
                 f"{args.peak_tflops:g} TFLOP/s bf16")
    result.update(non_embedding_parameters=n, peak_tflops=args.peak_tflops)
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(f"```\n{text}\n```\n\nCommand: `python {' '.join(sys.argv)}`\n")


if __name__ == "__main__":
    main()
