"""EWC, KD and DER++ (baselines/ewc.py, kd.py, derpp.py): the property that defines each, their state for
resume, and a real run of each on the tiny suite."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from cpt_bench.common.settings import DapSettings
from cpt_bench.training.plugin import method_class
from cpt_bench.training.stage import SequenceState, Stage
from cpt_bench.training.trainer import DapTrainer

from conftest import assert_one_line_error, run_cli, stage_state

CATS = [f"the cats was {a} and {b} ." for a in ("purr", "nap", "soft", "calm") for b in ("hiss", "bite")]
DOGS = [f"the dogs was {a} and {b} ." for a in ("wag", "fetch", "loyal") for b in ("growl", "bark", "snap")]


@pytest.fixture
def tiny(tiny_lm):
    from accelerate import Accelerator

    tokenizer = tiny_lm.tokenizer
    settings = DapSettings(steps=3, batch_size=4, seq_len=16, lr=1e-2, mlm_probability=0.3)

    def stage(lm, blocks, index=0, resumed=False):
        """What a method's stage events see, without a trainer."""
        return stage_state(lm, blocks, name=f"stage{index}", index=index, tokenizer=tokenizer,
                           accelerator=Accelerator(cpu=True), settings=settings, resumed=resumed)

    blocks = {"cats": tiny_lm.blocks(CATS * 4, "cats"), "dogs": tiny_lm.blocks(DOGS * 4, "dogs")}
    return SimpleNamespace(model=tiny_lm.model, stage=stage, blocks=blocks, tokenizer=tokenizer, settings=settings,
                           batch=lambda seed=1, rows=4: tiny_lm.batch(blocks["cats"], seed, rows))


def _method(name, **settings):
    cls = method_class(name)
    return cls(cls.Settings(**settings))


def _train(tiny, method, domains=("cats", "dogs")):
    """Run `method` through the shared trainer on the tiny blocks: (per-step losses, final weights)."""
    from accelerate import Accelerator

    model = tiny.model()
    accelerator = Accelerator(cpu=True)
    trainer = DapTrainer(accelerator, tiny.tokenizer, tiny.settings, method, seed=0, show_progress=False)
    method.before_sequence(SequenceState(model, tiny.tokenizer, accelerator, list(domains), 0))
    torch.manual_seed(0)  # dropout
    losses = []
    for index, name in enumerate(domains):
        record = trainer.train_stage(model, tiny.blocks[name], Stage(name, [name]), index)
        losses.extend(record.loss_curve)  # one point per step at these step counts
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- EWC

def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_points_back(tiny):
    from cpt_bench.baselines.ewc import trained_parameters

    model = tiny.model()
    method = _method("ewc", fisher_batches=4)
    method.after_stage(tiny.stage(model, tiny.blocks["cats"]))
    assert method.penalty(model).item() == 0.0
    assert all(f.sum() > 0 for f in method.fisher.values() if f.numel() > 64)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    parameters = trained_parameters(model)

    def weighted_distance():
        return sum((method.fisher[n] * (p.detach() - method.anchor[n]).pow(2)).sum()
                   for n, p in parameters.items())

    before = {n: (p.detach() - method.anchor[n]).abs() for n, p in parameters.items()}
    penalty = method.penalty(model)
    assert penalty.item() > 0 and math.isclose(penalty.item(), weighted_distance().item(), rel_tol=1e-5)
    penalty.backward()
    largest = max(f.max().item() for f in method.fisher.values())
    with torch.no_grad():  # descent on the penalty alone: theta - theta* shrinks by 1 - F / (2 max F)
        for p in parameters.values():
            p.sub_(0.25 / largest * p.grad)
    for name, p in parameters.items():
        after = (p.detach() - method.anchor[name]).abs()
        assert (after <= before[name]).all(), name  # nothing moves away from theta*
        protected = method.fisher[name] > 1e-3 * largest
        assert (after[protected] < before[name][protected]).all(), name  # protected weights move towards it
        free = method.fisher[name] == 0
        assert torch.equal(after[free], before[name][free]), name  # F = 0: no pull
    assert weighted_distance() < penalty.item()


def test_ewc_fisher_is_the_mean_squared_batch_gradient(tiny):
    from accelerate import Accelerator

    from cpt_bench.baselines.ewc import diagonal_fisher
    from cpt_bench.models.loading import lm_loss

    model = tiny.model().train()
    batches = [tiny.batch(seed=1), tiny.batch(seed=2)]
    totals, count = diagonal_fisher(model, batches, Accelerator(cpu=True))
    assert count == 2 and model.training  # the mode is restored
    model.eval()
    squares = []
    for batch in batches:
        model.zero_grad()
        lm_loss(model, batch).backward()
        squares.append({n: p.grad.pow(2) for n, p in model.named_parameters() if p.grad is not None})
    for name, square in squares[0].items():
        torch.testing.assert_close(totals[name] / count, (square + squares[1][name]) / 2)


def test_ewc_fisher_accumulates_online_and_the_anchor_moves(tiny):
    decay = 0.7
    model = tiny.model()
    method = _method("ewc", decay=decay, fisher_batches=3)
    method.after_stage(tiny.stage(model, tiny.blocks["cats"], index=0))
    first = {n: f.clone() for n, f in method.fisher.items()}
    with torch.no_grad():  # what training on the next domain would do
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    second_stage = tiny.stage(model, tiny.blocks["dogs"], index=1)
    fresh = method.domain_fisher(second_stage)  # deterministic: seeded batches, eval mode
    method.after_stage(second_stage)
    for name, f in method.fisher.items():
        torch.testing.assert_close(f, decay * first[name] + fresh[name])
        assert torch.equal(method.anchor[name], dict(model.named_parameters())[name].detach())
    assert method.domains_learned == 2
    trained = sum(p.numel() for p in model.parameters())
    assert method.overhead(model)["buffers"] == 2 * trained


def test_ewc_state_round_trips(tiny):
    model = tiny.model()
    method = _method("ewc", fisher_batches=2)
    method.after_stage(tiny.stage(model, tiny.blocks["cats"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    restored = _method("ewc", fisher_batches=2)
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    assert restored.domains_learned == 1
    assert torch.equal(restored.penalty(model), method.penalty(model))


# ---------------------------------------------------------------- KD

def test_kd_with_alpha_zero_is_naive_step_for_step(tiny):
    naive_losses, naive_weights = _train(tiny, _method("naive"))
    kd_losses, kd_weights = _train(tiny, _method("kd", alpha=0.0))
    assert len(naive_losses) == 6 and kd_losses == naive_losses
    assert all(torch.equal(naive_weights[k], kd_weights[k]) for k in naive_weights)
    # and the distillation term does act when weighted (so the comparison above can fail)
    distilled_losses, distilled_weights = _train(tiny, _method("kd", alpha=1.0))
    assert distilled_losses != naive_losses
    assert not all(torch.equal(naive_weights[k], distilled_weights[k]) for k in naive_weights)


def test_kd_teacher_is_the_frozen_model_as_it_was_before_the_stage(tiny):
    model = tiny.model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    method = _method("kd")
    method.before_sequence(SequenceState(model, tiny.tokenizer, None, ["cats", "dogs"], 0))
    stage = tiny.stage(model, tiny.blocks["cats"], index=0)
    method.before_first_step(stage)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for seed in (1, 2):  # real steps on the student through the method's loss
        method.loss(stage, tiny.batch(seed)).backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher = method.teacher.state_dict()
    assert all(torch.equal(teacher[k], original[k]) for k in original)  # stage 0: the original model, frozen
    assert not all(torch.equal(model.state_dict()[k], original[k]) for k in original)
    assert not any(p.requires_grad for p in method.teacher.parameters()) and not method.teacher.training
    method.after_stage(stage)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    method.before_first_step(tiny.stage(model, tiny.blocks["dogs"], index=1))
    assert all(torch.equal(method.teacher.state_dict()[k], after_first[k]) for k in after_first)
    # resumed inside stage 1 (model trained on since): the teacher is the saved one, not the current model
    state = copy.deepcopy(method.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    restored = _method("kd")
    restored.before_sequence(SequenceState(tiny.model(), tiny.tokenizer, None, ["cats", "dogs"], 0))
    restored.load_state_dict(state)
    restored.before_first_step(tiny.stage(model, tiny.blocks["dogs"], index=1, resumed=True))
    assert all(torch.equal(restored.teacher.state_dict()[k], after_first[k]) for k in after_first)
    assert method.overhead(model)["buffers"] == sum(p.numel() for p in model.parameters())


def test_distillation_is_zero_for_equal_logits_and_scaled_by_t_squared():
    from cpt_bench.baselines.kd import distillation

    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    assert distillation(student, student, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(teacher / 3.0, -1)
    expected = (p * (p.log() - torch.log_softmax(student / 3.0, -1))).sum(-1).mean() * 9.0
    torch.testing.assert_close(distillation(student, teacher, 3.0), expected)


# ---------------------------------------------------------------- DER++

def _reservoir(size, seed=0):
    from cpt_bench.baselines.derpp import ReservoirBuffer

    return ReservoirBuffer(size, torch.Generator().manual_seed(seed))


def _offer(buffer, domain, rows, vocab=3):
    """Offer `rows` blocks of `domain` (its index in every token), each with one masked position."""
    ids = torch.full((rows, 4), domain)
    labels = torch.full((rows, 4), -100)
    labels[:, 1] = domain
    buffer.add(ids, torch.ones_like(ids), labels, torch.full((rows, vocab), float(domain)))


def test_reservoir_keeps_a_uniform_sample_of_the_stream_and_its_size():
    size, per_domain, domains = 400, 1000, 4
    buffer = _reservoir(size)
    _offer(buffer, 0, 150)
    assert len(buffer) == 150  # not full yet: everything kept
    for domain in range(domains):
        for _ in range((per_domain - (150 if domain == 0 else 0)) // 50):
            _offer(buffer, domain, 50)  # the stream arrives in batches, domain after domain
    assert buffer.seen == domains * per_domain and len(buffer) == size and len(buffer.input_ids) == size
    shares = torch.bincount(buffer.input_ids[:, 0], minlength=domains)
    # binomial std of a domain's count (the hypergeometric one is smaller): 4 std is a 6e-5 false alarm
    tolerance = 4 * math.sqrt(size * (1 / domains) * (1 - 1 / domains))
    assert (shares - size / domains).abs().max() <= tolerance, shares.tolist()
    assert shares.sum() == size
    # each slot's logits belong to its block (the slot's domain)
    assert all(torch.all(buffer.logits[i] == buffer.input_ids[i, 0]) for i in range(size))


def test_reservoir_sample_is_a_batch_with_its_stored_logits():
    buffer = _reservoir(8)
    for domain in range(5):
        _offer(buffer, domain, 2)
    batch, logits = buffer.sample(6, torch.device("cpu"))
    assert batch["input_ids"].shape == (6, 4) and logits.shape == (6, 3)
    torch.testing.assert_close(logits[:, 0].long(), batch["labels"][:, 1])  # row i's logits are block i's
    assert buffer.sample(100, torch.device("cpu"))[0]["input_ids"].shape[0] == 8  # never more than stored


def test_derpp_stores_the_logits_the_block_had_when_seen_and_matches_them(tiny):
    from cpt_bench.models.loading import masked_logits

    model = tiny.model().eval()  # no dropout: the stored logits are reproducible
    method = _method("derpp", alpha=1.0, beta=0.0, buffer_size=16)
    stage = tiny.stage(model, tiny.blocks["cats"])
    first = tiny.batch(seed=1)
    loss = method.loss(stage, first)
    assert len(method.buffer) == 4 and torch.equal(loss, stage.objective(**first))  # empty buffer: plain MLM
    expected = masked_logits(model, first).detach().split((first["labels"] != -100).sum(1).tolist())
    for row in range(4):
        torch.testing.assert_close(method.buffer.logits[row].float(), expected[row], atol=2e-3, rtol=2e-3)
    second = tiny.batch(seed=2)
    unchanged = method.loss(stage, second) - stage.objective(**second)
    assert 0 <= unchanged.item() < 1e-5  # same model: the logit-matching term is (fp16 rounding) zero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert (method.loss(stage, tiny.batch(seed=3)) - stage.objective(**tiny.batch(seed=3))).item() > 1e-3
    assert len(method.buffer) == 12


def test_derpp_state_round_trips(tiny):
    model = tiny.model()
    method = _method("derpp", buffer_size=6)
    method.before_sequence(SequenceState(model, tiny.tokenizer, None, ["cats"], 3))
    stage = tiny.stage(model, tiny.blocks["cats"])
    for seed in (1, 2, 3):
        method.loss(stage, tiny.batch(seed))
    restored = _method("derpp", buffer_size=6)
    restored.before_sequence(SequenceState(model, tiny.tokenizer, None, ["cats"], 0))  # another seed: overwritten
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    assert restored.buffer.seen == 12 and len(restored.buffer) == 6
    for _ in range(2):  # the same draws from the same contents
        (a, a_logits), (b, b_logits) = (m.buffer.sample(3, torch.device("cpu")) for m in (method, restored))
        assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(a_logits, b_logits)
    assert method.overhead(model)["buffers"] == restored.overhead(model)["buffers"] > 3 * 6 * 16


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_each_runs_on_the_tiny_suite(tiny_suite, tmp_path):
    trained = None
    for name in ("ewc", "kd", "derpp"):  # one test: the base scores are computed once, then cached
        out = tmp_path / name
        result = run_cli("run", "--method", name, "--suite", str(tiny_suite), "--output", str(out), "--quiet",
                         "--eval", "final", "--set", "dap.steps=3", "--set", f"{name}.{SMALL[name]}")
        assert result.exit_code == 0, result.output
        (path,) = out.glob("*.json")
        run = json.loads(path.read_text())
        assert run["method"] == name and run["method_config"][SMALL[name].partition("=")[0]] == 2
        assert len(run["stages"]) == 2 and all(math.isfinite(s["loss_last"]) for s in run["stages"])
        buffers = run["overhead"]["buffers"]
        if name == "ewc":
            trained = buffers // 2  # Fisher and anchor of every parameter
        elif name == "kd":
            assert buffers == trained  # the teacher: one copy of the LM
        else:  # token ids, attention mask and labels of 512 blocks of 16 tokens, and the kept logits
            assert buffers > 3 * 512 * 16


SMALL = {"ewc": "fisher_batches=2", "kd": "temperature=2", "derpp": "replay_batch_size=2"}


@pytest.mark.parametrize("setting, fragment", [
    ("ewc.decay=1.5", "decay"), ("ewc.fisher_batches=0", "fisher_batches"),
    ("kd.temperature=0", "temperature"),
    ("derpp.buffer_size=0", "buffer_size"), ("derpp.logits_dtype=int8", "logits_dtype")])
def test_bad_settings_are_one_line_errors(tiny_suite, tmp_path, setting, fragment):
    method = setting.partition(".")[0]
    result = run_cli("run", "--method", method, "--suite", str(tiny_suite), "--output", str(tmp_path),
                     "--quiet", "--set", setting)
    assert_one_line_error(result, fragment)
