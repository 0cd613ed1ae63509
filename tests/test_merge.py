"""Model merging after every stage: the weights end at reference + alpha * (task vector), trimmed for TIES;
alpha = 1 is naive; the reference is the original model or the stage's start."""

from __future__ import annotations

import pytest
import torch

from cpt_bench.training.plugin import method_class
from cpt_bench.training.stage import SequenceState

from conftest import assert_one_line_error, stage_state
from interruptions import only_result, run_tiny


def merge(**settings):
    cls = method_class("merge")
    return cls(cls.Settings(**settings))


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def shift(model, amount: float) -> None:
    """Stand-in for a stage's training: every weight moves by `amount`."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(amount)


@pytest.mark.parametrize(("alpha", "reference", "expected"), [
    (0.5, "original", [1.0, 1.5]),   # stage 1: 0 + .5*2; stage 2 starts at 1, moves to 3: 0 + .5*3
    (0.5, "previous", [1.0, 2.0]),   # stage 2: its start 1 + .5*(3 - 1)
    (0.25, "original", [0.5, 0.625]),
    (1.0, "original", [2.0, 4.0]),   # alpha 1: no merge
    (0.0, "previous", [0.0, 0.0]),   # alpha 0: every stage undone
])
def test_each_stage_ends_at_its_reference_plus_alpha_times_its_task_vector(tiny_lm, alpha, reference, expected):
    model = tiny_lm.model()
    original = weights(model)
    method = merge(alpha=alpha, reference=reference)
    method.before_sequence(SequenceState(model, tiny_lm.tokenizer, None, ["cats", "dogs"], 0))
    for index, want in enumerate(expected):
        state = stage_state(model, index=index)
        method.before_stage(state)
        shift(model, 2.0)
        method.after_stage(state)
        for name, parameter in model.named_parameters():
            assert torch.allclose(parameter, original[name] + want, atol=1e-6), (index, name)


def test_ties_keeps_only_the_largest_entries_of_the_task_vector(tiny_lm):
    import sys

    trimmed = sys.modules[method_class("merge").__module__].trimmed  # the registry's copy of the plugin module
    vector = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.05, 4.0, -0.4, 0.0, 1.0])
    assert trimmed(vector, 0.3).tolist() == [0.0, -5.0, 0.0, 2.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0]
    assert torch.equal(trimmed(vector, 1.0), vector)
    model = tiny_lm.model()
    original = weights(model)
    method = merge(kind="ties", density=0.2, alpha=1.0)
    method.before_sequence(SequenceState(model, tiny_lm.tokenizer, None, ["cats"], 0))
    state = stage_state(model)
    method.before_stage(state)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    method.after_stage(state)
    for name, parameter in model.named_parameters():
        moved = (parameter != original[name]).sum().item()
        assert moved == max(1, round(0.2 * parameter.numel())), name


def test_alpha_one_is_naive(tiny_suite, tmp_path):
    assert run_tiny(tiny_suite, tmp_path / "naive", "naive").exit_code == 0
    assert run_tiny(tiny_suite, tmp_path / "merge", "merge", "--set", "merge.alpha=1").exit_code == 0
    got, want = only_result(tmp_path / "merge"), only_result(tmp_path / "naive")
    assert got["matrix"] == want["matrix"] and got["perplexity"] == want["perplexity"]
    assert [s["loss_curve"] for s in got["stages"]] == [s["loss_curve"] for s in want["stages"]]


@pytest.mark.parametrize(("option", "message"), [
    ("merge.alpha=1.5", "merge.alpha: must be in [0, 1]"),
    ("merge.alpha=-0.1", "merge.alpha: must be in [0, 1]"),
    ("merge.density=0", "merge.density: must be in (0, 1]"),
    ("merge.kind=average", "merge.kind"),
])
def test_bad_merge_settings_are_one_line_and_write_nothing(tiny_suite, tmp_path, option, message):
    out = tmp_path / "out"
    result = run_tiny(tiny_suite, out, "merge", "--set", option)
    assert_one_line_error(result, message)
    assert not out.exists() or not list(out.glob("*.json"))
