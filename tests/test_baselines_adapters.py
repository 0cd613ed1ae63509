"""Per-domain adapter baselines (baselines/adapter.py: bottleneck adapters; baselines/lora.py: LoRA via peft):
the frozen backbone, one adapter per domain that later domains never touch, which parameters train in each
phase, copies that fine-tune their own adapters, restart from `state_dict`, and runs through the CLI."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from cpt_bench.baselines.adapter import AdaptedProjection
from cpt_bench.common.settings import DapSettings, FinetuneSettings
from cpt_bench.data.batches import MaskingCollator, mlm_blocks
from cpt_bench.data.texts import EndTaskData, EndTaskSplit
from cpt_bench.evaluation.evaluator import EndTaskEvaluator
from cpt_bench.models.loading import lm_head, lm_loss
from cpt_bench.training.adapters import adapter_key
from cpt_bench.training.plugin import method_class
from cpt_bench.training.stage import SequenceState, Stage
from cpt_bench.training.trainer import DapTrainer

from conftest import assert_one_line_error, run_cli, stage_state

METHODS = ["adapter", "lora"]
DOMAINS = ["cats", "dogs"]
WORDS = {"cats": ("purr", "nap", "soft", "hiss", "bite", "claw"),
         "dogs": ("wag", "fetch", "loyal", "growl", "bark")}


@pytest.fixture
def tiny(tiny_model_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    blocks = {d: mlm_blocks([f"the {d} was {a} and {b} ." for a in WORDS[d] for b in WORDS[d]] * 2,
                            tokenizer, 16, f"tiny-{d}") for d in DOMAINS}
    texts = [f"the cats was {w} ." for w in ("purr", "hiss", "nap", "bite", "soft", "claw")] * 2
    split = EndTaskSplit(texts, None, [0, 1] * 6, "tiny")
    task = EndTaskData("cats", ["pos", "neg"], split, split, None, "macro", {}, evaluator="prompt",
                       template="{text} {mask} .", verbalizer={"pos": ["good"], "neg": ["bad"]})
    return SimpleNamespace(model_dir=tiny_model_dir, tokenizer=tokenizer, blocks=blocks, task=task,
                           accelerator=Accelerator(cpu=True),
                           dap=DapSettings(steps=3, batch_size=4, seq_len=16, lr=1e-2, warmup=0.0,
                                           mlm_probability=0.3))


def _model(tiny):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(tiny.model_dir)


def _start(name, model, **settings):
    cls = method_class(name)
    method = cls(cls.Settings(**settings))
    method.before_sequence(SequenceState(model, None, None, DOMAINS, 0))
    return method


def _train(tiny, method, model, index):
    trainer = DapTrainer(tiny.accelerator, tiny.tokenizer, tiny.dap, method, seed=0, show_progress=False)
    domain = DOMAINS[index]
    trainer.train_stage(model, tiny.blocks[domain], Stage(domain, [domain]), index)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _batch(tiny):
    collate = MaskingCollator(tiny.tokenizer, 0.3, torch.Generator().manual_seed(1))
    return collate([tiny.blocks["cats"][i] for i in range(4)])


def _ids(parameters):
    return {id(p) for p in parameters}


def _adapter(method, model, domain):
    return method.adapter_parameters(model, adapter_key(domain))


@pytest.mark.parametrize("name", METHODS)
def test_backbone_bitwise_unchanged_and_old_adapters_untouched(name, tiny):
    model = _model(tiny)
    backbone = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    batch = _batch(tiny)
    method = _start(name, model)
    _train(tiny, method, model, 0)
    cats = method.state_dict()["adapters"]["cats"]
    finetune = FinetuneSettings(epochs=1, batch_size=4, lr=1e-2, max_length=16)
    evaluator = EndTaskEvaluator(tiny.accelerator, tiny.tokenizer, finetune, False)
    evaluator.evaluate(method.end_task_model(model, 0), tiny.task, seed=0)  # fine-tunes a copy of adapter "cats"
    _train(tiny, method, model, 1)

    for parameter_name, parameter, before in backbone:
        assert torch.equal(parameter, before), parameter_name
    adapters = _ids(_adapter(method, model, "cats")) | _ids(_adapter(method, model, "dogs"))
    assert _ids(model.parameters()) - adapters == _ids(p for _, p, _ in backbone)  # none replaced either
    for key, value in method.state_dict()["adapters"]["cats"].items():
        assert torch.equal(value, cats[key]), key
    # both stages trained something: each adapter moved away from the identity it started as
    method.activate(model, None)
    plain = _logits(model, batch)
    for domain in DOMAINS:
        method.activate(model, adapter_key(domain))
        assert not torch.allclose(_logits(model, batch), plain), domain


@pytest.mark.parametrize("name", METHODS)
def test_new_adapter_is_the_identity_and_probe_sees_the_backbone(name, tiny):
    model = _model(tiny)
    batch = _batch(tiny)
    original = _logits(model, batch)
    method = _start(name, model)
    method.before_stage(stage_state(model, name="cats", index=0))
    assert torch.equal(_logits(model, batch), original)  # W_up = 0 / LoRA B = 0
    with torch.no_grad():
        for parameter in _adapter(method, model, "cats"):
            parameter.add_(0.5)
    assert not torch.allclose(_logits(model, batch), original)
    probe = method.probe_model(model)
    assert torch.equal(_logits(probe, batch), original)  # no adapter active
    trainable = _ids(p for p in probe.parameters() if p.requires_grad)
    assert trainable == _ids(model.parameters()) - _ids(_adapter(method, model, "cats"))


@pytest.mark.parametrize("name", METHODS)
def test_only_the_domains_adapter_trains_in_each_phase(name, tiny):
    model = _model(tiny)
    method = _start(name, model)
    method.before_stage(stage_state(model, name="cats", index=0))
    method.before_stage(stage_state(model, name="dogs", index=1))
    cats, dogs = _ids(_adapter(method, model, "cats")), _ids(_adapter(method, model, "dogs"))
    assert cats and dogs and not cats & dogs
    assert _ids(method.trainable_parameters(model)) == dogs  # what the stage's optimizer gets
    lm = method.end_task_model(model, 0)
    assert _ids(p for p in lm.parameters() if p.requires_grad) == cats
    with_head = _start(name, _model(tiny), finetune_mlm_head=True)
    with_head.before_stage(stage_state(with_head.model, name="cats", index=0))
    lm = with_head.end_task_model(with_head.model, 0)
    assert _ids(p for p in lm.parameters() if p.requires_grad) == \
        _ids(_adapter(with_head, lm, "cats")) | _ids(lm_head(lm).parameters())
    per_domain = sum(p.numel() for p in _adapter(method, model, "cats"))
    assert method.overhead(model)["extra_parameters"] == 2 * per_domain


@pytest.mark.parametrize("name", METHODS)
def test_fine_tuning_a_copy_changes_only_the_copys_adapter(name, tiny):
    model = _model(tiny)
    batch = _batch(tiny)
    method = _start(name, model)
    method.before_stage(stage_state(model, name="cats", index=0))
    lm = method.end_task_model(model, 0)
    before = _logits(lm, batch)
    snapshot = [p.detach().clone() for p in _adapter(method, model, "cats")]
    twin = copy.deepcopy(lm)
    optimizer = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=1.0)
    twin.train()
    for _ in range(3):
        lm_loss(twin, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(_adapter(method, twin, "cats"), snapshot))
    assert not torch.allclose(_logits(twin, batch), before)  # the copy routes through its own adapter
    for parameter, old in zip(_adapter(method, model, "cats"), snapshot):
        assert torch.equal(parameter, old)
    assert torch.equal(_logits(model, batch), before)


@pytest.mark.parametrize("name", METHODS)
def test_end_task_of_a_domain_without_adapter_is_an_error(name, tiny):
    model = _model(tiny)
    method = _start(name, model)
    method.before_stage(stage_state(model, name="cats", index=0))
    with pytest.raises(ValueError, match=r"'dogs' .* no adapter"):
        method.end_task_model(model, 1)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_rebuilds_the_adapters_after_a_restart(name, tiny):
    model = _model(tiny)
    batch = _batch(tiny)
    method = _start(name, model)
    _train(tiny, method, model, 0)
    state = method.state_dict()
    assert state["domains"] == ["cats"]
    assert all(isinstance(v, torch.Tensor) for v in state["adapters"]["cats"].values())
    expected = _logits(method.end_task_model(model, 0), batch)

    restarted_model = _model(tiny)
    restarted = method_class(name)()
    restarted.before_sequence(SequenceState(restarted_model, None, None, DOMAINS, 0))
    restarted.load_state_dict(state)  # the resume order: the method's objects first, then its state
    assert torch.equal(_logits(restarted.end_task_model(restarted_model, 0), batch), expected)
    assert restarted.overhead(restarted_model) == method.overhead(model)


def test_adapter_placement_and_size_on_bert_and_roberta(tiny):
    from transformers import RobertaConfig, RobertaForMaskedLM

    model = _model(tiny)  # hidden 32, one layer
    method = _start("adapter", model, placement="ffn", reduction=8)
    method.before_stage(stage_state(model, name="cats", index=0))
    sites = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedProjection)}
    assert list(sites) == ["bert.encoder.layer.0.output.dense"]
    assert sites["bert.encoder.layer.0.output.dense"].adapters["domain_cats"].down.out_features == 32 // 8

    roberta = RobertaForMaskedLM(RobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=40))
    method = _start("adapter", roberta)
    method.before_stage(stage_state(roberta, name="cats", index=0))
    assert sorted(n for n, m in roberta.named_modules() if isinstance(m, AdaptedProjection)) == [
        f"roberta.encoder.layer.{i}.{site}" for i in range(2)
        for site in ("attention.output.dense", "output.dense")]
    lora = _start("lora", RobertaForMaskedLM(roberta.config), targets=["ffn"], r=2)
    lora.before_stage(stage_state(lora.model, name="cats", index=0))
    adapted = sorted({n.split(".lora_")[0] for n, _ in lora.model.named_parameters() if ".lora_" in n})
    assert adapted == [f"roberta.encoder.layer.{i}.{site}" for i in range(2)
                       for site in ("intermediate.dense", "output.dense")]


@pytest.mark.parametrize("name", METHODS)
def test_cli_run_keeps_general_knowledge_and_records_overhead(name, tiny_suite, tmp_path):
    out = tmp_path / "runs"
    result = run_cli("run", "--method", name, "--suite", str(tiny_suite), "--output", str(out), "--quiet",
                     "--eval", "full")
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*.json")
    run = json.loads(path.read_text())
    f1 = run["matrix"]["macro_f1"]
    assert f1[0][0] is not None and f1[0][1] is None and None not in f1[1]
    # probes fine-tune the frozen backbone with no adapter: exactly the original model's probe
    general = run["probes"]["general"]
    assert general["stages"] == [general["base"]] * 2
    assert run["overhead"]["extra_parameters"] > 0
    assert run["method_config"]["finetune_mlm_head"] is False


def test_bad_adapter_settings_are_one_line_errors(tiny_suite, tmp_path):
    for setting, fragment in (("adapter.placement=middle", "placement"), ("adapter.reduction=0", "reduction"),
                              ("lora.targets=[query,gate]", "targets"), ("lora.r=0", "r and alpha")):
        method = setting.split(".")[0]
        result = run_cli("run", "--method", method, "--suite", str(tiny_suite), "--output", str(tmp_path),
                         "--set", setting)
        assert_one_line_error(result, fragment)
