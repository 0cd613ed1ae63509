"""Learning-rate schedules within a DAP stage (`dap.schedule`, `dap.rewarm`, `dap.final_lr_fraction`,
`dap.decay_fraction`): their shapes, the trainer's use of them, and bad values."""

from __future__ import annotations

import math

import pytest

from cpt_bench.common.settings import DAP_SETTINGS_ADDED_LATER, DapSettings, as_dict, hashed_dap_settings
from cpt_bench.training.optim import lr_factor

from conftest import assert_one_line_error, run_cli

TOTAL, WARMUP = 100, 10


def curve(kind: str, **options) -> list[float]:
    return [lr_factor(kind, step, WARMUP, TOTAL, **options) for step in range(TOTAL)]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "wsd", "rsqrt"])
def test_every_schedule_warms_up_linearly_to_the_peak_and_never_exceeds_it(kind):
    values = curve(kind)
    assert values[:WARMUP] == [(step + 1) / WARMUP for step in range(WARMUP)]
    assert max(values) == 1.0 and min(values) >= 0.0


def test_linear_is_the_earlier_schedule_bit_for_bit_and_ends_at_its_final_fraction():
    earlier = [max(0.0, (TOTAL - s) / (TOTAL - WARMUP)) for s in range(WARMUP, TOTAL)]
    assert curve("linear")[WARMUP:] == earlier
    with_floor = curve("linear", final=0.1)
    assert with_floor[WARMUP] == 1.0 and math.isclose(lr_factor("linear", TOTAL, WARMUP, TOTAL, final=0.1), 0.1)
    assert all(a >= b for a, b in zip(with_floor[WARMUP:], with_floor[WARMUP + 1:]))


def test_cosine_decays_to_its_final_fraction_through_the_midpoint():
    values = curve("cosine", final=0.2)
    assert values[WARMUP] == 1.0
    midpoint = WARMUP + (TOTAL - WARMUP) // 2
    assert math.isclose(values[midpoint], 0.2 + 0.8 * 0.5, abs_tol=1e-9)
    assert math.isclose(lr_factor("cosine", TOTAL, WARMUP, TOTAL, final=0.2), 0.2)


def test_wsd_holds_the_peak_then_decays_over_its_last_fraction():
    values = curve("wsd", decay_fraction=0.2)
    assert values[WARMUP:80] == [1.0] * (80 - WARMUP)  # stable until the last 20 steps
    assert values[80] == 1.0 and values[81] < 1.0 and values[-1] == pytest.approx(1 / 20)
    assert curve("constant")[WARMUP:] == [1.0] * (TOTAL - WARMUP)


def test_rsqrt_falls_as_one_over_the_square_root_of_the_step_down_to_its_floor():
    assert lr_factor("rsqrt", 39, WARMUP, TOTAL) == pytest.approx(math.sqrt(10 / 40))
    assert lr_factor("rsqrt", 99, WARMUP, TOTAL, final=0.5) == 0.5


def stage_rates(tiny_lm, **settings) -> list[list[float]]:
    """The learning rate of every optimizer step of two 6-step stages of naive DAP on the tiny model."""
    from accelerate import Accelerator

    from cpt_bench.training.plugin import Method
    from cpt_bench.training.stage import Stage
    from cpt_bench.training.trainer import DapTrainer

    rates: list[list[float]] = []

    class RecordRates(Method):
        name = "record-rates"

        def before_stage(self, stage):
            rates.append([])

        def after_backward(self, stage):
            rates[-1].append(stage.optimizer.param_groups[0]["lr"])

    texts = ["the cats was purr and nap ."] * 40
    blocks = tiny_lm.blocks(texts, "cats")
    dap = DapSettings(steps=6, batch_size=4, seq_len=16, lr=1e-3, warmup=0.5, **settings)
    trainer = DapTrainer(Accelerator(cpu=True), tiny_lm.tokenizer, dap, RecordRates(), 0, show_progress=False)
    model = tiny_lm.model()
    for index in range(2):
        trainer.train_stage(model, blocks, Stage("cats", ["cats"]), index)
    return rates


def test_rewarming_warms_up_at_every_stage_and_without_it_later_stages_start_at_the_peak(tiny_lm):
    rewarmed = stage_rates(tiny_lm)
    assert rewarmed[0] == rewarmed[1] and rewarmed[1][0] == pytest.approx(1e-3 / 3)
    once = stage_rates(tiny_lm, rewarm=False, schedule="constant")
    assert once[0][0] == pytest.approx(1e-3 / 3) and once[1] == [pytest.approx(1e-3)] * 6


def test_new_schedule_settings_leave_earlier_hashes_alone_and_enter_them_when_set():
    assert not set(hashed_dap_settings(as_dict(DapSettings()))) & set(DAP_SETTINGS_ADDED_LATER)
    assert hashed_dap_settings(as_dict(DapSettings(schedule="wsd")))["schedule"] == "wsd"


@pytest.mark.parametrize(("option", "message"), [
    ("dap.schedule=triangle", "dap.schedule"),
    ("dap.final_lr_fraction=1.5", "dap.final_lr_fraction: must be in [0, 1]"),
    ("dap.decay_fraction=0", "dap.decay_fraction: must be in (0, 1]"),
])
def test_bad_schedule_settings_are_one_line(tiny_suite, tmp_path, option, message):
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--set", option, "--output", str(out))
    assert_one_line_error(result, message)
    assert not out.exists() or not list(out.glob("*.json"))


# ---------------------------------------------------------------- optimizer state between stages

def stage_moments(tiny_lm, optimizer_state: str) -> tuple[list, list]:
    """(first moments at each stage's first step, first moments at each stage's end) of two naive stages."""
    from accelerate import Accelerator

    from cpt_bench.training.plugin import Method
    from cpt_bench.training.stage import Stage
    from cpt_bench.training.trainer import DapTrainer

    at_start, at_end = [], []

    def first_moments(optimizer):
        return [state["exp_avg"].clone() for state in optimizer.state.values() if "exp_avg" in state]

    class RecordMoments(Method):
        name = "record-moments"

        def before_first_step(self, stage):
            at_start.append(first_moments(stage.optimizer.optimizer))

        def after_stage(self, stage):
            at_end.append(first_moments(stage.optimizer.optimizer))

    blocks = tiny_lm.blocks(["the cats was purr and nap ."] * 40, "cats")
    dap = DapSettings(steps=4, batch_size=4, seq_len=16, lr=1e-3, optimizer_state=optimizer_state)
    trainer = DapTrainer(Accelerator(cpu=True), tiny_lm.tokenizer, dap, RecordMoments(), 0, show_progress=False)
    model = tiny_lm.model()
    for index in range(2):
        trainer.train_stage(model, blocks, Stage("cats", ["cats"]), index)
    return at_start, at_end


def test_carried_moments_start_the_next_stage_where_the_last_ended_and_reset_ones_start_empty(tiny_lm):
    import torch

    at_start, at_end = stage_moments(tiny_lm, "reset")
    assert at_start[0] == [] and at_start[1] == []
    at_start, at_end = stage_moments(tiny_lm, "carry")
    assert at_start[0] == [] and len(at_start[1]) == len(at_end[0]) > 0
    assert all(torch.equal(a, b) for a, b in zip(at_start[1], at_end[0]))


def test_moments_are_not_carried_into_parameters_of_other_shapes():
    import torch

    from cpt_bench.training.trainer import carry_moments

    def optimizer(*shapes):
        parameters = [torch.nn.Parameter(torch.ones(shape)) for shape in shapes]
        opt = torch.optim.AdamW(parameters, lr=0.1)
        sum(p.sum() for p in parameters).backward()
        opt.step()
        return opt

    carried = optimizer((2, 3), (3,)).state_dict()
    assert carry_moments(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2, 3)),
                                            torch.nn.Parameter(torch.ones(3))], lr=0.1), carried)
    assert not carry_moments(torch.optim.AdamW([torch.nn.Parameter(torch.ones(4, 3)),
                                                torch.nn.Parameter(torch.ones(3))], lr=0.1), carried)
    assert not carry_moments(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2, 3))], lr=0.1), carried)


@pytest.mark.parametrize("batch", [5, 7])  # around the stage boundary: 7 resumes from stage 1's end checkpoint
def test_a_run_that_carries_its_optimizer_state_resumes_to_the_same_result(tiny_suite, tmp_path, monkeypatch,
                                                                             batch):
    from interruptions import Crash, assert_same_result, crash_at_batch, only_result, run_tiny

    carry = ("--set", "dap.optimizer_state=carry")
    reference = run_tiny(tiny_suite, tmp_path / "reference", "naive", *carry)
    assert reference.exit_code == 0, reference.output
    expected = only_result(tmp_path / "reference")
    assert [s["optimizer_state"] for s in expected["stages"]] == ["reset", "carried"]
    crash_at_batch(monkeypatch, batch)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, tmp_path / "crashed", "naive", *carry)
    monkeypatch.undo()
    resumed = run_tiny(tiny_suite, tmp_path / "crashed", "naive", *carry)
    assert resumed.exit_code == 0, resumed.output
    assert_same_result(only_result(tmp_path / "crashed"), expected)
    assert [s["optimizer_state"] for s in only_result(tmp_path / "crashed")["stages"]] == ["reset", "carried"]
