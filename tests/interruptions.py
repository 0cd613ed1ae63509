"""Helpers for tests that interrupt a run and resume it: simulated crashes and the comparison of results."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


class Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing in the run catches it."""


# what must be equal after a resume: everything measured
COMPARED = ("matrix", "base", "metrics", "probes", "perplexity", "method_config", "domains", "matrix_rows",
            "overhead", "method_summary")
STAGE_FIELDS = ("domain", "steps", "tokens", "loss_first", "loss_last", "loss_curve", "loss_terms", "skipped_steps")


def only_result(out: Path) -> dict:
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def run_tiny(tiny_suite, out: Path, method: str, *extra: str):
    """`cpt-bench run` of `method` on the tiny suite, checkpointing every 2 steps."""
    return run_cli("run", "--method", method, "--suite", str(tiny_suite), "--output", str(out), "--quiet",
                   "--checkpoint-every", "2", *extra)


def crash_at_batch(monkeypatch, number: int) -> None:
    """Crash when the trainer draws DAP batch `number` (counted over the whole run, from 1)."""
    from cpt_bench.training import trainer

    original, drawn = trainer.endless, [0]

    def endless(loader):
        for batch in original(loader):
            drawn[0] += 1
            if drawn[0] == number:
                raise Crash(f"batch {number}")
            yield batch

    monkeypatch.setattr(trainer, "endless", endless)


def crash_at_finetune(monkeypatch, number: int) -> None:
    """Crash inside fine-tune number `number` of the run (base scores come from the cache)."""
    from cpt_bench.evaluation.evaluator import EndTaskEvaluator

    original, calls = EndTaskEvaluator.evaluate, [0]

    def evaluate(self, lm, task, seed):
        calls[0] += 1
        if calls[0] == number:
            raise Crash(f"fine-tune {number}")
        return original(self, lm, task, seed)

    monkeypatch.setattr(EndTaskEvaluator, "evaluate", evaluate)


def assert_same_result(resumed: dict, reference: dict) -> None:
    for key in COMPARED:
        assert resumed[key] == reference[key], key
    assert len(resumed["stages"]) == len(reference["stages"])
    for got, want in zip(resumed["stages"], reference["stages"]):
        for field in STAGE_FIELDS:
            assert got[field] == want[field], (got["domain"], field)


def crash_then_resume(suite, out: Path, method: str, monkeypatch, crash) -> dict:
    """Run `method` into `out` with `crash()` armed until it crashes, then resume it; the resumed result."""
    import pytest

    crash()
    with pytest.raises(Crash):
        run_tiny(suite, out, method)
    monkeypatch.undo()
    resumed = run_tiny(suite, out, method)
    assert resumed.exit_code == 0, resumed.output
    return only_result(out)
