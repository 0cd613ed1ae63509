"""Per-step cost of soft-masking relative to naive continual DAP, measured side by side in one run.

    python benchmarks/softmask_step_cost.py [--steps 30] [--repeats 3] [--suite synthetic]

Alternates a naive stage and a softmask stage of --steps optimizer steps on the same model, data and batch
(the suite's DAP settings), --repeats times, and reports medians: the step-time ratio, and the importance
pass (after a domain) as a fraction of a full stage of the suite's default length.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="synthetic")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    from accelerate import Accelerator

    from cpt_bench.plugin import Method, SequenceState, Stage, method_class
    from cpt_bench.runner import RunRequest, plan_run
    from cpt_bench.trainer import DapTrainer

    plan = plan_run(RunRequest(method="softmask", suite=args.suite, show_progress=False))
    accelerator = Accelerator(cpu=True)
    domain = plan.domains[0]
    blocks = plan.data.blocks(domain, plan.dap.seq_len)
    settings = dataclasses.replace(plan.dap, steps=args.steps)
    step_times = {"naive": [], "softmask": []}
    importance_seconds = []
    for repeat in range(args.repeats):
        for name in ("naive", "softmask"):
            model = copy.deepcopy(plan.original_model)
            method = Method() if name == "naive" else method_class("softmask")()
            method.on_sequence_start(SequenceState(model, plan.tokenizer, accelerator, plan.domains, 0))
            if name == "softmask":  # a later stage: protected by an accumulated importance, contrastive on
                method.accumulated = {k: torch.rand_like(v) for k, v in method.units.zeros().items()}
            trainer = DapTrainer(accelerator, plan.tokenizer, settings, method, seed=repeat, show_progress=False)
            started = time.perf_counter()
            record = trainer.train_stage(model, blocks, Stage(domain, [domain]), stage_index=1)
            total = time.perf_counter() - started
            step_times[name].append(record.seconds / args.steps)
            if name == "softmask":
                importance_seconds.append(total - record.seconds)  # after_domain: the domain's importance
    naive, softmask = (statistics.median(step_times[k]) for k in ("naive", "softmask"))
    importance = statistics.median(importance_seconds)
    stage = plan.dap.steps * softmask
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"suite {args.suite}, model {plan.model_name}, batch {plan.dap.batch_size} x {plan.dap.seq_len} tokens")
    print(f"naive step      {naive * 1000:.1f} ms (median of {args.repeats} x {args.steps} steps)")
    print(f"softmask step   {softmask * 1000:.1f} ms")
    print(f"softmask / naive step time: {softmask / naive:.2f}")
    print(f"importance pass {importance:.2f} s = {importance / stage:.1%} of a {plan.dap.steps}-step softmask stage")


if __name__ == "__main__":
    main()
