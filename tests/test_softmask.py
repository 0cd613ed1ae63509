"""Soft-masking (methods/softmask.py): gates, importance, normalisation, the optimizer-level mask, the
contrastive pairing, and the importance artifact of a real run."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import DapSettings
from cpt_bench.models.loading import lm_loss
from cpt_bench.models.units import UnitMap, accumulate, normalise
from cpt_bench.training.plugin import method_class
from cpt_bench.training.stage import SequenceState
from cpt_bench.training.trainer import LMObjective

from conftest import run_cli, stage_state


@pytest.fixture
def tiny(tiny_lm):
    from accelerate import Accelerator

    model, tokenizer = tiny_lm.model(), tiny_lm.tokenizer
    texts = [f"the cats was {a} and {b} ." for a in ("purr", "nap", "soft", "calm") for b in ("hiss", "bite", "claw")]
    blocks = tiny_lm.blocks(texts * 4, "tiny")
    settings = DapSettings(batch_size=4, seq_len=16, mlm_probability=0.3)
    stage = stage_state(model, blocks, index=1, tokenizer=tokenizer, accelerator=Accelerator(cpu=True),
                        settings=settings)
    return SimpleNamespace(model=model, tokenizer=tokenizer, stage=stage, batch=tiny_lm.batch(blocks))


def _softmask(model, **settings):
    cls = method_class("softmask")
    method = cls(cls.Settings(**settings))
    method.before_sequence(SequenceState(model, None, None, ["cats"], 0))
    return method


def test_gates_at_one_leave_outputs_bit_identical(tiny):
    model, batch = tiny.model.eval(), tiny.batch
    units = UnitMap(model)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with units.gated(units.ones()):
        gated = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(reference, gated)
    per_row = {k: v.expand(len(batch["input_ids"]), *v.shape) for k, v in units.ones().items()}
    with units.gated(per_row):
        assert torch.equal(reference, model(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits)


def test_zeroed_unit_has_zero_raw_importance(tiny):
    method = _softmask(tiny.model)
    layer = method.units.layers[0]
    silence = torch.ones(tiny.model.config.intermediate_size)
    silence[3] = 0.0
    # silence intermediate neuron 3 where its gate acts: the input of the FFN output projection
    handle = layer.output_dense.register_forward_pre_hook(lambda m, args: (args[0] * silence, *args[1:]))
    raw = method._importance(tiny.stage, general=False)
    handle.remove()
    assert raw["intermediate"][0, 3] == 0.0
    assert raw["intermediate"][0].sum() > 0 and raw["head"].sum() > 0 and raw["output"].sum() > 0


def test_general_proxy_needs_train_mode(tiny):
    """The public code computed the proxy in eval mode, where two passes are identical and the KL is 0."""
    proxy = method_class("softmask").proxy_loss
    ids, mask = tiny.batch["input_ids"], tiny.batch["attention_mask"]
    tiny.model.train()
    in_train_mode = proxy(tiny.model, ids, mask)
    tiny.model.eval()
    in_eval_mode = proxy(tiny.model, ids, mask)
    assert in_eval_mode < 1e-6  # identical passes (up to float error)
    assert in_train_mode > 1e-4 and in_train_mode > 1000 * in_eval_mode


def test_normalisation_is_per_layer_and_handles_a_constant_layer():
    values = torch.tensor([[1.0, 2.0, 3.0, 10.0], [100.0, 200.0, 300.0, 1000.0], [5.0, 5.0, 5.0, 5.0]])
    out = normalise({"head": values})["head"]
    assert torch.allclose(out[0], out[1])  # a layer's scale does not matter: standardised per layer
    assert torch.equal(out[2], torch.zeros(4))  # zero std: no unit stands out
    assert ((out >= 0) & (out <= 1)).all()
    assert out[0, 3] == out[0].max()


def test_accumulation_is_elementwise_max():
    a = {"head": torch.tensor([[0.1, 0.9], [0.5, 0.2]])}
    b = {"head": torch.tensor([[0.4, 0.3], [0.5, 0.8]])}
    assert torch.equal(accumulate(a, b)["head"], torch.tensor([[0.4, 0.9], [0.5, 0.8]]))
    assert torch.equal(accumulate(None, a)["head"], a["head"])


def _displacement(tiny, steps: int, method=None, layer_importance: torch.Tensor | None = None) -> torch.Tensor:
    """Distance each intermediate neuron's row moves under AdamW in `steps` steps (same data every time); the
    method's accumulated importance of layer 0's intermediate neurons is `layer_importance` (default: unit 0 at
    1, unit 1 at 0.9, the rest 0)."""
    model = copy.deepcopy(tiny.model).train()
    torch.manual_seed(0)
    stage = dataclasses.replace(tiny.stage, model=model, objective=LMObjective(model))
    if method is not None:
        method.before_sequence(SequenceState(model, None, None, ["cats"], 0))
        importance = method.units.zeros()
        if layer_importance is None:
            importance["intermediate"][0, 0] = 1.0
            importance["intermediate"][0, 1] = 0.9
        else:
            importance["intermediate"][0] = layer_importance
        method.accumulated = importance
        method.before_first_step(stage)
    weight = method.units.layers[0].sites["intermediate_dense"][0].weight if method else \
        UnitMap(model).layers[0].sites["intermediate_dense"][0].weight
    start = weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(steps):
        torch.manual_seed(1)  # same dropout masks with and without soft-masking
        lm_loss(model, tiny.batch).backward()
        if method:
            method.after_backward(stage)
        optimizer.step()
        if method:
            method.after_optimizer_step(stage)
        optimizer.zero_grad()
    return (weight.detach() - start).norm(dim=1)


def test_update_mask_controls_the_parameter_change_under_adamw(tiny):
    plain = _displacement(tiny, 1)
    masked = _displacement(tiny, 1, _softmask(tiny.model, contrastive=False))
    assert masked[0] == 0.0  # importance 1: does not move
    assert torch.isclose(masked[1], 0.1 * plain[1], rtol=1e-4)  # importance 0.9: a tenth of the move
    assert torch.isclose(masked[2], plain[2], rtol=1e-4)  # importance 0: unchanged behaviour
    several = _displacement(tiny, 5, _softmask(tiny.model, contrastive=False))
    assert several[0] == 0.0
    ratio = several[1] / _displacement(tiny, 5)[1]
    assert 0.05 < ratio < 0.2


def test_uniform_control_moves_every_unit_of_a_layer_by_the_same_fraction(tiny):
    plain = _displacement(tiny, 1)
    uniform = _displacement(tiny, 1, _softmask(tiny.model, contrastive=False, control="uniform"))
    keep = 1.0 - 1.9 / len(plain)  # 1 - the layer's mean importance (units at 1, 0.9 and 0)
    assert torch.allclose(uniform / plain, torch.full_like(plain, keep), rtol=1e-4)


def test_inverted_control_protects_the_least_important_units_most(tiny):
    ranks = torch.linspace(0.0, 1.0, tiny.model.config.intermediate_size)  # unit k more important than k - 1
    plain = _displacement(tiny, 1)
    real = _displacement(tiny, 1, _softmask(tiny.model, contrastive=False), ranks)
    inverted = _displacement(tiny, 1, _softmask(tiny.model, contrastive=False, control="inverted"), ranks)
    assert torch.allclose(real / plain, 1.0 - ranks, atol=1e-4)
    assert torch.allclose(inverted / plain, ranks, atol=1e-4)  # the order reversed: the last unit moves freely
    assert inverted[0] == 0.0 and real[-1] == 0.0


def test_budget_puts_that_fraction_of_every_layer_above_one_half():
    torch.manual_seed(0)
    raw = {"head": torch.rand(4, 12), "intermediate": torch.rand(3, 512) ** 4, "output": torch.rand(3, 37) * 100}
    for budget in (0.1, 0.2, 0.3, 1.0):
        for kind, values in normalise(raw, "budget", budget).items():
            units = values.shape[1]
            above = (values > 0.5).sum(dim=1)
            assert ((above - budget * units).abs() <= 1).all(), (kind, budget, above.tolist())
            assert ((values >= 0) & (values <= 1)).all()
    assert torch.equal(normalise({"head": torch.ones(2, 8)}, "budget", 0.2)["head"], torch.zeros(2, 8))


def test_tanh_pos_gives_zero_below_the_layers_mean_and_tanh_abs_above_it():
    values = torch.tensor([[1.0, 2.0, 3.0, 10.0, 0.5]])
    one_sided = normalise({"head": values}, "tanh_pos")["head"]
    two_sided = normalise({"head": values})["head"]
    below = values < values.mean()
    assert (one_sided[below] == 0).all() and (two_sided[below] > 0).all()
    assert torch.equal(one_sided[~below], two_sided[~below])


@pytest.mark.parametrize("setting, fragment", [("softmask.budget=0", "budget"), ("softmask.budget=1.5", "budget"),
                                               ("softmask.normalise=softmax", "normalise"),
                                               ("softmask.control=shuffled", "control")])
def test_bad_importance_settings_are_one_line_errors(setting, fragment, tiny_suite, tmp_path):
    from conftest import assert_one_line_error

    result = run_cli("run", "--method", "softmask", "--suite", str(tiny_suite), "--output", str(tmp_path),
                     "--set", setting)
    assert_one_line_error(result, fragment)
    assert not list(tmp_path.glob("*.json"))


def test_gradient_mask_is_cancelled_by_adam(tiny):
    """The public code's variant: a constant gradient scale barely changes an Adam step (why it is not ours)."""
    plain = _displacement(tiny, 1)
    masked = _displacement(tiny, 1, _softmask(tiny.model, contrastive=False, target="gradient"))
    assert 0 < masked[0] < 0.01 * plain[0]  # a zero gradient: only AdamW's weight decay moves it
    assert masked[1] > 0.5 * plain[1]  # 0.9 importance, yet more than half the unmasked move


def test_contrastive_positives_are_two_views_of_the_same_text(tiny, monkeypatch):
    from cpt_bench.methods import softmask

    captured = {}

    def capture(anchor, positive, negatives, temperature, offset=0):
        captured.update(anchor=anchor, positive=positive, negatives=negatives)
        return anchor.sum() * 0

    monkeypatch.setattr(softmask, "info_nce", capture)
    method = _softmask(tiny.model)
    method.accumulated = {k: torch.full_like(v, 0.5) for k, v in method.units.zeros().items()}
    tiny.model.eval()  # no dropout: the two views of one text coincide exactly
    method._contrastive(tiny.stage, tiny.batch)
    anchor, positive = captured["anchor"], captured["positive"]
    assert torch.allclose(anchor, positive)  # row i pairs with row i: the same text
    assert not torch.allclose(anchor[0], positive[1])  # other rows are other texts
    assert not torch.allclose(anchor, captured["negatives"])  # the gated network differs from the full one


def test_mlm_anchor_contrasts_the_mlm_pass_with_fixed_views_of_the_clean_text(tiny, monkeypatch):
    """The faster contrastive pairing (a variant of Sec. 3.3 at a third of the cost): the anchor is the MLM pass's
    representation of the masked text and carries the gradient; the positive is the full network on the same
    text unmasked, the negatives the gated network on it, both fixed targets without dropout."""
    from cpt_bench.methods import softmask
    from cpt_bench.models.loading import lm_body
    captured = {}
    real_info_nce = softmask.info_nce

    def capture(anchor, positive, negatives, temperature, offset=0):
        captured.update(anchor=anchor, positive=positive, negatives=negatives)
        return real_info_nce(anchor, positive, negatives, temperature, offset)

    monkeypatch.setattr(softmask, "info_nce", capture)
    model = tiny.model.train()
    method = _softmask(model, contrastive_views="mlm_anchor")
    method.accumulated = {k: torch.full_like(v, 0.5) for k, v in method.units.zeros().items()}
    stage = dataclasses.replace(tiny.stage, objective=LMObjective(model))
    loss = method.loss(stage, tiny.batch)
    anchor, positive, negatives = captured["anchor"], captured["positive"], captured["negatives"]
    assert anchor.requires_grad and not positive.requires_grad and not negatives.requires_grad
    assert model.training  # dropout is back on for the rest of the step

    model.eval()
    mask = tiny.batch["attention_mask"]
    with torch.no_grad():
        clean = softmask.pooled(lm_body(model)(input_ids=softmask.unmasked_ids(tiny.batch),
                                               attention_mask=mask)[0], mask)
        masked = softmask.pooled(lm_body(model)(input_ids=tiny.batch["input_ids"], attention_mask=mask)[0], mask)
    assert torch.allclose(positive, clean, atol=1e-6)  # row i: the same text, unmasked
    assert not torch.allclose(negatives, clean)  # the gated network differs from the full one
    assert not torch.allclose(masked, clean)  # the anchor's view is the masked text

    loss.backward()  # the contrastive term reaches the weights through the MLM pass alone
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.base_model.parameters()
               if p.requires_grad and p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.base_model.encoder.parameters())


def test_mlm_anchor_keeps_the_models_mode(tiny):
    model = tiny.model.eval()
    method = _softmask(model, contrastive_views="mlm_anchor")
    method.accumulated = {k: torch.full_like(v, 0.5) for k, v in method.units.zeros().items()}
    method.loss(dataclasses.replace(tiny.stage, objective=LMObjective(model)), tiny.batch)
    assert not model.training


def test_info_nce_prefers_matching_rows():
    from cpt_bench.methods.softmask import info_nce

    x = torch.randn(6, 16)
    assert info_nce(x, x, -x, 0.05) < info_nce(x, x.roll(1, 0), -x, 0.05)


def test_model_without_unit_map_is_bad_input():
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(BadInput, match="no unit map"):
        UnitMap(model)


def test_softmask_run_saves_importances_that_round_trip(tiny_suite, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "runs"
    result = run_cli("run", "--method", "softmask", "--suite", str(tiny_suite), "--output", str(out), "--quiet",
                     "--set", "softmask.importance_batches=2")
    assert result.exit_code == 0, result.output
    result_file = next(p for p in out.glob("*.json"))
    data = json.loads(result_file.read_text())
    assert data["method_config"]["target"] == "update"
    # the result says plainly that the update masking is this implementation's, not the paper's Sec. 3.2
    assert data["method_summary"]["formulation"].startswith("DAS with the soft-mask applied to the optimizer "
                                                            "update, because a constant gradient scale cancels")
    assert "softmask.target=gradient" in data["method_summary"]["formulation"]
    tensors = load_file(Path(out) / data["artifacts"]["importance"])
    stages = sorted({name.split("/")[0] for name in tensors})
    assert stages == ["00:general", "01:cats", "02:dogs"]
    previous = None
    for stage in stages:
        normalised = tensors[f"{stage}/normalised/head"]
        accumulated = tensors[f"{stage}/accumulated/head"]
        assert ((normalised >= 0) & (normalised <= 1)).all()
        expected = normalised if previous is None else torch.maximum(previous, normalised)
        assert torch.equal(accumulated, expected)
        previous = accumulated


def test_default_settings_are_the_papers_method():
    """`--method softmask` with no --set is DAS as the paper describes it (Sec. 3.1-3.3), except for the one
    documented correction: the soft-mask scales the optimizer update (target=update). A change of any of these
    defaults changes what the leaderboard's `softmask` row means, so it must be deliberate."""
    from dataclasses import asdict

    assert asdict(method_class("softmask").Settings()) == {
        "target": "update",  # ours; "gradient" is Sec. 3.2 as written (a constant scale cancels in AdamW)
        "soft_mask": True, "contrastive": True, "contrastive_weight": 1.0,
        "contrastive_views": "separate",  # Sec. 3.3: two dropout views and the gated view, all with gradient
        "temperature": 0.05, "general_importance": True, "random_importance": False, "importance_batches": 8,
        "other_parameters": "train",  # the paper trains embeddings, LayerNorms and the head normally
        "normalise": "tanh_abs",  # Sec. 3.1: |tanh| of the layer-standardised importance
        "budget": 0.2, "control": "none",
    }
    assert "optimizer update" in method_class("softmask").description
