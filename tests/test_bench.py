"""`cpt-bench bench`: the side-by-side step timing runs every kind end to end and reports its numbers (no
timing is asserted: the machines are shared and noisy)."""

from __future__ import annotations

import json

from conftest import assert_one_line_error, run_cli


def test_bench_runs_every_kind_and_writes_its_numbers(tiny_suite, tmp_path):
    out = tmp_path / "bench.json"
    variant = "softmask:softmask.contrastive_views=separate"
    result = run_cli("bench", "--suite", str(tiny_suite), "--steps", "2", "--repeats", "1", "--device", "cpu",
                     "--variant", variant, "--json", str(out))
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text())
    kinds = ["hf_trainer", "naive", "softmask", variant]
    assert numbers["kinds"] == kinds
    for kind in kinds:
        assert numbers["step_ms"][kind] > 0 and numbers["tokens_per_second"][kind] > 0
        assert numbers["peak_memory_mb"][kind] > 0
        assert kind in result.output
    assert numbers["step_ratio_to_naive"]["naive"] == 1.0
    assert numbers["hf_trainer_speedup"] == numbers["step_ms"]["hf_trainer"] / numbers["step_ms"]["naive"]
    assert numbers["importance_fraction"] > 0  # (the tiny suite's stages are shorter than its importance pass)
    assert numbers["general_importance_fraction"] > 0
    assert "general-knowledge importance" in result.output
    assert "our naive vs transformers.Trainer" in result.output


def test_bench_rejects_an_unknown_variant_before_measuring(tiny_suite):
    result = run_cli("bench", "--suite", str(tiny_suite), "--steps", "2", "--repeats", "1",
                     "--variant", "nosuch:dap.lr=1")
    assert result.exit_code == 2
    assert_one_line_error(result, "nosuch")
    result = run_cli("bench", "--suite", str(tiny_suite), "--steps", "2", "--repeats", "1",
                     "--set", "softmask.no_such_setting=1")
    assert result.exit_code == 2
    assert_one_line_error(result, "no_such_setting")
    # the benchmark file keeps the timing run's keys (CONTRACT.md): a profile is printed, never written there
    result = run_cli("bench", "--suite", str(tiny_suite), "--profile", "--json", "bench.json")
    assert result.exit_code == 2
    assert_one_line_error(result, "--profile")


def test_bench_profile_reports_where_each_kinds_time_goes(tiny_suite, monkeypatch):
    from cpt_bench.running import bench

    # in this process rather than one per kind (the CLI's way): the same measurement, without the start-up cost
    monkeypatch.setattr(bench, "_measure_in_process", bench.measure)
    text, numbers = bench.profile_report(bench.BenchRequest(suite=str(tiny_suite), steps=2, device="cpu"),
                                         ["hf_trainer", "naive"])
    assert list(numbers) == ["hf_trainer", "naive"]
    for kind, measured in numbers.items():
        assert f"## {kind}" in text
        # the matrix products are part of the profiled operators, and every kind has some: the Trainer's steps
        # are inside the profiled block too, not only its set-up
        assert 0 < measured["matmul_ms_per_step"] <= measured["profiled_ms_per_step"]
        assert "aten::addmm" in measured["profile"]


def test_bench_times_the_importance_passes_themselves(tiny_suite, monkeypatch):
    """The importance passes are the method's events, timed on their own: what the trainer does after a stage's
    last step besides (here a second of freeing memory) is not counted as importance."""
    import time

    import accelerate

    from cpt_bench.running import bench

    free_memory = accelerate.Accelerator.free_memory

    def slow_free_memory(self, *args):
        time.sleep(1.0)
        return free_memory(self, *args)

    monkeypatch.setattr(accelerate.Accelerator, "free_memory", slow_free_memory)
    measured = bench.measure("softmask", bench.BenchRequest(suite=str(tiny_suite), steps=2, device="cpu"))
    assert 0 < measured["after_stage_seconds"] < 1.0  # the domain's importance pass on a tiny model: ~10 ms
    assert measured["first_before_first_step_seconds"] > 0  # the general-knowledge pass
