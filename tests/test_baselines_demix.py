"""DEMix (baselines/demix.py): expert routing and mixture, earlier experts untouched by later domains, a new
expert copied from the candidate with the lowest (process-reduced) MLM loss, the domain posterior, end to
end."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cpt_bench.baselines.demix import expert_ffns, expert_parameters, routed, set_mixture
from cpt_bench.common.settings import DapSettings
from cpt_bench.data.batches import MaskingCollator
from cpt_bench.training.plugin import method_class
from cpt_bench.training.stage import SequenceState, Stage
from cpt_bench.training.trainer import DapTrainer

from conftest import assert_one_line_error, run_cli, stage_state

CATS = [f"the cats was {a} and {b} ." for a in ("purr", "nap", "soft", "calm")
        for b in ("hiss", "bite", "claw")]
DOGS = [f"the dogs was {a} and {b} ." for a in ("wag", "fetch", "loyal")
        for b in ("growl", "bark", "snap", "howl")]


@pytest.fixture
def tiny(tiny_lm):
    from accelerate import Accelerator

    model = tiny_lm.model()
    blocks = {"cats": tiny_lm.blocks(CATS * 4, "cats"), "dogs": tiny_lm.blocks(DOGS * 4, "dogs")}
    return SimpleNamespace(model=model, original=copy.deepcopy(model), tokenizer=tiny_lm.tokenizer, blocks=blocks,
                           batch=tiny_lm.batch(blocks["cats"]), accelerator=Accelerator(cpu=True))


def _demix(tiny, **settings):
    cls = method_class("demix")
    method = cls(cls.Settings(**settings))
    method.before_sequence(SequenceState(tiny.model, tiny.tokenizer, tiny.accelerator, ["cats", "dogs"], 0,
                                         [CATS, DOGS]))
    return method


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _stage_state(tiny, domain: str, index: int):
    return stage_state(tiny.model, tiny.blocks[domain], name=domain, index=index, tokenizer=tiny.tokenizer,
                       accelerator=tiny.accelerator)


def _train(tiny, method, domain: str, index: int, steps: int = 4) -> None:
    settings = DapSettings(steps=steps, batch_size=4, seq_len=16, lr=1e-2, warmup=0.0)
    DapTrainer(tiny.accelerator, tiny.tokenizer, settings, method, 0, show_progress=False).train_stage(
        tiny.model, tiny.blocks[domain], Stage(domain, [domain]), index)


def _expert(model, index: int) -> dict[str, torch.Tensor]:
    return {str(i): p.detach().clone() for i, p in enumerate(expert_parameters(model, index))}


def _shared(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_stays_a_stock_lm_and_one_expert_reproduces_it(tiny):
    _demix(tiny)
    assert type(tiny.model) is type(tiny.original)
    assert torch.equal(_logits(tiny.model, tiny.batch), _logits(tiny.original, tiny.batch))
    assert torch.equal(_logits(copy.deepcopy(tiny.model), tiny.batch), _logits(tiny.original, tiny.batch))


def test_mixture_is_the_weighted_sum_of_expert_ffns(tiny):
    method = _demix(tiny)
    method.before_stage(_stage_state(tiny, "cats", 0))
    with torch.no_grad():
        for name, p in tiny.model.named_parameters():
            if ".experts.1." in name:
                p.add_(torch.randn_like(p) * 0.5)
    layer = tiny.model.bert.encoder.layer[0]
    expert_in, expert_out = expert_ffns(tiny.model)[0]
    h = torch.randn(2, 5, tiny.model.config.hidden_size)
    act = layer.intermediate.intermediate_act_fn

    def ffn(k):
        return expert_out.experts[k](act(expert_in.experts[k](h)))

    set_mixture(tiny.model, [(0, 0.3), (1, 0.7)])
    mixed = expert_out(layer.intermediate(h))
    assert torch.allclose(mixed, 0.3 * ffn(0) + 0.7 * ffn(1), atol=1e-6)
    assert not torch.allclose(mixed, ffn(0), atol=1e-3)  # the perturbation matters
    set_mixture(tiny.model, [(1, 1.0)])
    assert torch.equal(expert_out(layer.intermediate(h)), ffn(1))


@pytest.mark.parametrize("shared", ["train", "freeze"])
def test_earlier_experts_are_unchanged_by_later_domains(tiny, shared):
    method = _demix(tiny, shared_parameters=shared)
    _train(tiny, method, "cats", 0)
    cats, original, shared_after_cats = _expert(tiny.model, 1), _expert(tiny.model, 0), _shared(tiny.model)
    with routed(tiny.model, [(1, 1.0)]):
        cats_logits = _logits(tiny.model, tiny.batch)
    _train(tiny, method, "dogs", 1)
    assert method.expert_names == ["original", "cats", "dogs"]
    assert _same(_expert(tiny.model, 1), cats)  # weights of the earlier expert: bitwise the same
    assert _same(_expert(tiny.model, 0), original)
    assert not _same(_expert(tiny.model, 2), _expert(tiny.model, 1))  # dogs' expert moved away from its init
    with routed(tiny.model, [(1, 1.0)]):
        cats_logits_now = _logits(tiny.model, tiny.batch)
    losses = method.summary()["expert_loss_on_own_domain"]["cats"]
    assert len(losses) == 2
    if shared == "freeze":
        assert _same(_shared(tiny.model), shared_after_cats)
        assert torch.equal(cats_logits_now, cats_logits) and losses[0] == losses[1]
    else:  # shared parameters trained: the earlier expert's outputs move, and the summary measures it
        assert not _same(_shared(tiny.model), shared_after_cats)
        assert not torch.equal(cats_logits_now, cats_logits) and losses[0] != losses[1]


def _teach(tiny, index: int, domain: str, steps: int = 15) -> None:
    """Train expert `index` alone on `domain` (outside the method), so it models that domain best."""
    parameters = expert_parameters(tiny.model, index)
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=3e-2)
    collate = MaskingCollator(tiny.tokenizer, 0.3, torch.Generator().manual_seed(5))
    tiny.model.train()
    with routed(tiny.model, [(index, 1.0)]):
        for step in range(steps):
            blocks = tiny.blocks[domain]
            batch = collate([blocks[(4 * step + i) % len(blocks)] for i in range(4)])
            loss = tiny.model(**batch).loss
            grads = torch.autograd.grad(loss, parameters)
            for p, g in zip(parameters, grads):
                p.grad = g
            optimizer.step()
    for p, flag in zip(parameters, flags):
        p.requires_grad_(flag)


@pytest.mark.parametrize("taught", ["original", "cats"])
def test_new_expert_starts_from_the_candidate_with_lowest_loss(tiny, taught):
    method = _demix(tiny)
    method.before_stage(_stage_state(tiny, "cats", 0))
    method.before_first_step(_stage_state(tiny, "cats", 0))
    assert method.inits[0]["copied_from"] == "original"  # the only candidate at stage 0
    index = {"original": 0, "cats": 1}
    _teach(tiny, index[taught], "dogs")
    candidates = {name: _expert(tiny.model, k) for name, k in index.items()}
    assert not _same(candidates["original"], candidates["cats"])
    method.before_stage(_stage_state(tiny, "dogs", 1))
    method.before_first_step(_stage_state(tiny, "dogs", 1))
    init = method.inits[1]
    other = "cats" if taught == "original" else "original"
    assert init["expert"] == "dogs" and init["copied_from"] == taught
    assert init["candidate_losses"][taught] < init["candidate_losses"][other]
    assert _same(_expert(tiny.model, 2), candidates[taught])
    assert not _same(_expert(tiny.model, 2), candidates[other])
    assert method.state_dict()["inits"][1]["copied_from"] == taught


def test_init_choice_follows_the_losses_reduced_across_processes(tiny):
    """Every process must copy the same expert: the choice uses accelerator.reduce's answer, not the local
    losses."""
    method = _demix(tiny)
    method.before_stage(_stage_state(tiny, "cats", 0))
    method.before_first_step(_stage_state(tiny, "cats", 0))
    reduced = []

    def reduce(tensor, reduction):  # another process saw the opposite ranking
        reduced.append(reduction)
        return torch.tensor([2.0, 1.0]) if len(tensor) == 2 else tensor

    fake = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=2, reduce=reduce,
                           autocast=contextlib.nullcontext)
    state = _stage_state(tiny, "dogs", 1)
    state.accelerator = fake
    method.before_stage(_stage_state(tiny, "dogs", 1))
    method.before_first_step(state)
    assert reduced == ["mean"]
    assert method.inits[1]["copied_from"] == "cats" and method.inits[1]["candidate_losses"]["cats"] == 1.0


def test_domain_posterior_and_end_task_model(tiny):
    method = _demix(tiny)
    method.before_stage(_stage_state(tiny, "cats", 0))
    method.before_first_step(_stage_state(tiny, "cats", 0))
    method.before_stage(_stage_state(tiny, "dogs", 1))
    method.before_first_step(_stage_state(tiny, "dogs", 1))
    # three identical experts: the posterior is uniform
    weights = method.domain_posterior(tiny.model, CATS, 0)
    assert torch.allclose(weights, torch.full((3,), 1 / 3), atol=1e-5)
    _teach(tiny, 1, "cats")  # the cats expert now models cats text best
    live_mixture = expert_ffns(tiny.model)[0][0].routing.mixture
    lm = method.end_task_model(tiny.model, 0)
    weights = method.mixtures[-1]["weights"]
    assert abs(sum(weights.values()) - 1) < 1e-5 and weights["cats"] > 0.5 > weights["original"], weights
    assert type(lm) is type(tiny.original) and expert_ffns(tiny.model)[0][0].routing.mixture == live_mixture
    mixed = [k for k, _ in expert_ffns(lm)[0][0].routing.mixture]
    trained = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert {n for n, _ in lm.named_parameters() if ".experts." not in n} <= trained  # shared: fine-tuned
    for k in range(3):
        in_lm = any(f".experts.{k}." in n for n in trained)
        assert in_lm == (k in mixed), k
    own = method_class("demix")(method_class("demix").Settings(inference="own"))
    own.__dict__.update({k: v for k, v in method.__dict__.items() if k not in ("settings", "_task_mixtures")})
    assert expert_ffns(own.end_task_model(tiny.model, 1))[0][0].routing.mixture == [(2, 1.0)]
    assert expert_ffns(method.probe_model(tiny.model))[0][0].routing.mixture == [(0, 1.0)]


def test_state_dict_restores_experts_and_choices(tiny, tiny_model_dir):
    from transformers import AutoModelForMaskedLM

    method = _demix(tiny)
    _train(tiny, method, "cats", 0, steps=2)
    state = method.state_dict()
    assert state["expert_names"] == ["original", "cats"] and all(
        isinstance(t, torch.Tensor) for t in state["experts"].values())
    restored = method_class("demix")()
    fresh = SimpleNamespace(**{**vars(tiny), "model": AutoModelForMaskedLM.from_pretrained(tiny_model_dir)})
    restored.before_sequence(SequenceState(fresh.model, tiny.tokenizer, tiny.accelerator, ["cats"], 0))
    restored.load_state_dict(state)  # the resume order: the method's objects first, then its state
    assert restored.inits == method.inits
    assert _same(_expert(fresh.model, 1), _expert(tiny.model, 1))


def test_run_records_choices_mixtures_and_overhead(tiny_suite, tmp_path):
    out = tmp_path / "runs"
    result = run_cli("run", "--suite", str(tiny_suite), "--method", "demix", "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(next(Path(out).glob("*.json")).read_text())
    summary = data["method_summary"]
    assert summary["experts"] == ["original", "cats", "dogs"]
    assert summary["inits"][0] == {**summary["inits"][0], "expert": "cats", "copied_from": "original"}
    assert summary["inits"][1]["copied_from"] in ("original", "cats")
    assert [(m["after"], m["task"]) for m in summary["mixtures"]] == [("cats", "cats"), ("dogs", "cats"),
                                                                       ("dogs", "dogs")]
    assert set(summary["mixtures"][0]["weights"]) <= {"original", "cats"}
    config = {"hidden": 32, "ffn": 64}
    one_ffn = 2 * config["hidden"] * config["ffn"] + config["ffn"] + config["hidden"]  # one layer
    assert data["overhead"]["extra_parameters"] == 2 * one_ffn
    assert data["method_config"]["inference"] == "posterior"


def test_frozen_shared_parameters_and_own_expert_forget_nothing(tiny_suite, tmp_path):
    out = tmp_path / "runs"
    result = run_cli("run", "--suite", str(tiny_suite), "--method", "demix", "--output", str(out), "--quiet",
                     "--set", "demix.shared_parameters=freeze", "--set", "demix.inference=own")
    assert result.exit_code == 0, result.output
    data = json.loads(next(Path(out).glob("*.json")).read_text())
    f1 = data["matrix"]["macro_f1"]
    assert f1[1][0] == f1[0][0] and data["metrics"]["forgetting_macro_f1"] == 0.0
    # the probe reads the original expert through unchanged shared parameters: the original model
    assert data["probes"]["general"]["stages"] == [data["probes"]["general"]["base"]] * 2


def test_bad_settings_are_one_line_errors(tiny_suite, tmp_path):
    for bad in ("demix.init_batches=0", "demix.inference=sometimes"):
        result = run_cli("run", "--suite", str(tiny_suite), "--method", "demix", "--output", str(tmp_path),
                         "--quiet", "--set", bad)
        assert_one_line_error(result, bad.split("=")[0].split(".")[1])
