"""DAP throughput and model-FLOPs utilisation on one GPU, bf16: `naive` and `softmask` steps of our trainer on a
randomly initialised roberta-base-sized masked LM (no download), alongside `transformers.Trainer`.

    python benchmarks/gpu_throughput.py [--batch-size 64] [--seq-len 512] [--steps 20] [--repeats 2]
                                        [--peak-tflops 989] [--variant KIND ...] [--output results/perf/gpu.md]

Kinds: transformers.Trainer, our naive and softmask steps (in a later stage: masking and the contrastive loss
on), plus the variants (default: naive with the decoder's vocabulary unpadded, `dap.vocab_pad_multiple=1`;
naive with `dap.compile=true`; softmask with the earlier `contrastive_views=separate`).

MFU = 6 · N · tokens/s / peak, N = parameters without the embeddings (the usual convention), peak = the card's
dense bf16 tensor throughput (H100/H200 SXM: 989 TFLOP/s; pass --peak-tflops for another card). Two other
accountings are printed beside it (`flop_counts`): 6N with every parameter, and the FLOPs a masked-logits step
needs with attention counted. One command,
a few minutes; `--tiny --device cpu` is a smoke test of the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# the unpadded decoder (the 50 265-word vocabulary as it is) measures what `dap.vocab_pad_multiple` (64 on a GPU)
# gains, side by side
DEFAULT_VARIANTS = ["naive:dap.vocab_pad_multiple=1", "naive:dap.compile=true",
                    "softmask:softmask.contrastive_views=separate"]


def build_model(folder: Path, tiny: bool) -> dict[str, int]:
    """A roberta-base-sized (or tiny) RobertaForMaskedLM with random weights and a local tokenizer; returns its
    parameter counts and sizes (for the FLOP accountings)."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from cpt_bench.running.synthetic import build_tokenizer

    words = [f"w{i}" for i in range(5000)]
    tokenizer = build_tokenizer(words, 514)
    tiny_size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    base_size = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    size = tiny_size if tiny else base_size
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id, **size)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    every = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    encoder = sum(p.numel() for n, p in model.named_parameters() if ".encoder." in n)
    return {"all": every, "non_embedding": every - embeddings, "encoder": encoder, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}


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


def flop_counts(counts: dict[str, int], seq_len: int, mlm_probability: float = 0.15) -> dict[str, float]:
    """Model FLOPs per token under three accountings (forward + backward = 3 x forward):
    `6N_non_embedding` (the headline MFU), `6N_all` (every parameter, embeddings included: the literal 6N, which
    counts the tied decoder at every position though we compute it at the masked ones only), and
    `with_attention` (PaLM-style: 6 x encoder parameters + 12 L d S for the attention scores, plus the MLM head
    and decoder at the masked positions only: the work a masked-logits step really needs)."""
    layers, width, vocab = counts["layers"], counts["hidden_size"], counts["vocab_size"]
    head = width * width + width * vocab  # transform + decoder matrices
    return {"6N_non_embedding": 6 * counts["non_embedding"], "6N_all": 6 * counts["all"],
            "with_attention": 6 * counts["encoder"] + 12 * layers * width * seq_len + 6 * head * mlm_probability}


def add_mfu(result: dict, counts: dict, seq_len: int, peak_tflops: float) -> list[str]:
    """Each kind's model FLOP utilisation under every FLOP accounting, into `result`; the lines that show them."""
    flops = flop_counts(counts, seq_len)
    peak = peak_tflops * 1e12
    result["mfu"] = {}
    result["mfu_by_accounting"] = {}
    lines = []
    for kind in result["kinds"]:
        tokens_per_second = result["tokens_per_second"][kind]
        by_accounting = {name: per_token * tokens_per_second / peak for name, per_token in flops.items()}
        result["mfu"][kind] = mfu = by_accounting["6N_non_embedding"]
        result["mfu_by_accounting"][kind] = by_accounting
        lines.append(f"{kind:48s} {tokens_per_second:10.0f} tokens/s   MFU {mfu:.1%}   (6N all parameters "
                     f"{by_accounting['6N_all']:.1%}, with attention {by_accounting['with_attention']:.1%})")
    lines.append(f"MFU = 6 N tokens/s / peak, N = {counts['non_embedding'] / 1e6:.1f} M non-embedding parameters, "
                 f"peak {peak_tflops:g} TFLOP/s bf16; 6N all parameters: N = {counts['all'] / 1e6:.1f} M; "
                 f"with attention: {flops['with_attention'] / 1e6:.0f} MFLOP per token (see flop_counts)")
    result.update(non_embedding_parameters=counts["non_embedding"], parameter_counts=counts,
                  flops_per_token=flops, peak_tflops=peak_tflops)
    return lines


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
    from cpt_bench.running.bench import BenchRequest, profile_report, run_bench, table

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        counts = build_model(folder / "model", args.tiny)
        precision = "bf16" if args.device == "cuda" else "no"
        suite = write_suite(folder, folder / "model", args.batch_size, args.seq_len, precision)
        os.environ.setdefault("CPT_BENCH_CACHE", str(folder / "cache"))
        if args.profile is not None:
            request = BenchRequest(suite=str(suite), steps=args.steps, device=args.device)
            text, _ = profile_report(request, args.profile or ["naive", "softmask"])
            print(text, flush=True)
            if args.output:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output).write_text(f"{text}\nCommand: `python {' '.join(sys.argv)}`\n")
            return
        variants = args.variant if args.variant is not None else DEFAULT_VARIANTS
        request = BenchRequest(suite=str(suite), steps=args.steps, repeats=args.repeats, device=args.device,
                               variants=variants)
        result = run_bench(request, echo=lambda line: print(line, flush=True))
    text = "\n".join([table(result), "", *add_mfu(result, counts, args.seq_len, args.peak_tflops)])
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(f"```\n{text}\n```\n\nCommand: `python {' '.join(sys.argv)}`\n")


if __name__ == "__main__":
    main()
