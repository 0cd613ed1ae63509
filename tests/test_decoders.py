"""Causal LMs (decoders): loading, next-token blocks, the shared loss against the model's own, held-out
perplexity and bits per byte, end-to-end runs on tiny random GPT-2, GPT-NeoX and Llama configs built here."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cpt_bench.common.errors import BadInput
from cpt_bench.data.batches import MaskingCollator, causal_blocks
from cpt_bench.models.loading import is_causal_lm, lm_loss, load_lm
from cpt_bench.running.results import validate_result

from conftest import FILLER, WORDS, assert_one_line_error, run_cli

FAMILIES = ["gpt2", "gpt_neox", "llama"]


def decoder_config(family: str, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": vocab_size, "pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": eos_id}
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=64, **common)
    # grouped-query attention: 4 query heads share 2 key/value heads; SwiGLU MLP
    return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, max_position_embeddings=64, **common)


@pytest.fixture(scope="session")
def decoder_dirs(tmp_path_factory):
    """family -> a folder with a tiny random decoder of that family and a word-level tokenizer with [EOS]."""
    from transformers import AutoModelForCausalLM

    from cpt_bench.running.synthetic import build_tokenizer

    vocabulary = sorted({w for pair in WORDS.values() for group in pair for w in group} | set(FILLER) | set(WORDS))
    tokenizer = build_tokenizer(vocabulary, 64, causal=True)
    folders = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        config = decoder_config(family, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        folders[family] = path
    return folders


TEXTS = ["the cats was purr and nap .", "a dogs is loyal .", "the general was good and fine ."]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decoder_loads_as_a_causal_lm(decoder_dirs, family):
    model, tokenizer = load_lm(str(decoder_dirs[family]))
    assert is_causal_lm(model) and tokenizer.padding_side == "right"


def test_blocks_put_the_end_of_text_token_between_texts_and_label_the_next_token(tiny_lm, decoder_dirs):
    _, tokenizer = load_lm(str(decoder_dirs["gpt2"]))
    blocks = causal_blocks(TEXTS, tokenizer, 8, "fixture")
    stream = []
    for text in TEXTS:
        stream += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert len(blocks) == (len(stream) - 1) // 8
    for i, block in enumerate(blocks):
        assert block["input_ids"] == stream[8 * i: 8 * i + 8]
        assert block["labels"] == stream[8 * i + 1: 8 * i + 9]  # the next token of every input
    assert tokenizer.eos_token_id in blocks[0]["input_ids"]  # the first text ends inside the first block


def test_padding_never_enters_the_loss(decoder_dirs):
    _, tokenizer = load_lm(str(decoder_dirs["gpt2"]))
    collate = MaskingCollator(tokenizer)
    batch = collate([{"input_ids": [5, 6, 7, 8], "labels": [6, 7, 8, 9]}, {"input_ids": [5, 6], "labels": [6, 7]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8, 9], [6, 7, -100, -100]]
    assert batch["input_ids"][1].tolist()[:2] == [5, 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shared_loss_is_the_models_own_next_token_loss_with_the_same_gradients(decoder_dirs, family):
    model, tokenizer = load_lm(str(decoder_dirs[family]))
    blocks = causal_blocks(TEXTS * 4, tokenizer, 8, "fixture")
    batch = MaskingCollator(tokenizer)([blocks[i] for i in range(3)])
    ours = lm_loss(model, batch)
    ours.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # the model's own shift: inputs one token longer, labels = inputs
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    theirs = model(input_ids=full, labels=full).loss
    theirs.backward()
    assert torch.allclose(ours, theirs, atol=1e-5)
    for ours_grad, p in zip(our_grads, model.parameters(), strict=True):
        assert torch.allclose(ours_grad, p.grad, atol=1e-5)


def test_bits_per_byte_of_a_uniform_model_matches_a_hand_computation(decoder_dirs):
    from accelerate import Accelerator

    from cpt_bench.evaluation.perplexity import heldout_scores

    model, tokenizer = load_lm(str(decoder_dirs["gpt2"]))
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: each of the V tokens has probability 1/V
    blocks = causal_blocks(TEXTS, tokenizer, 6, "fixture")
    perplexity, bits_per_byte = heldout_scores(model, blocks, tokenizer, Accelerator(cpu=True), 4, 0.15)
    vocab = model.config.vocab_size
    tokens = sum(len(b["labels"]) for b in blocks)
    text_bytes = sum(len(" ".join(tokenizer.convert_ids_to_tokens(b["labels"])).encode()) for b in blocks)
    assert perplexity == pytest.approx(vocab, rel=1e-4)
    assert bits_per_byte == pytest.approx(tokens * math.log(vocab) / (math.log(2) * text_bytes), rel=1e-4)


def decoder_suite(tiny_suite, model_dir):
    config = yaml.safe_load(tiny_suite.read_text())
    config["model"] = str(model_dir)
    tiny_suite.write_text(yaml.safe_dump(config))
    return tiny_suite


@pytest.mark.parametrize("family", FAMILIES)
def test_a_naive_run_on_a_decoder_writes_a_valid_result(tiny_suite, decoder_dirs, tmp_path, family):
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(decoder_suite(tiny_suite, decoder_dirs[family])),
                     "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    [path] = out.glob("*.json")
    run = json.loads(path.read_text())
    validate_result(run, path.name)
    perplexity = run["perplexity"]
    assert perplexity["objective"] == "causal"
    assert all(math.isfinite(v) and v > 0 for row in [perplexity["base"], *perplexity["stages"],
                                                       perplexity["bits_per_byte"]["base"]] for v in row)
    assert all(math.isfinite(v) for v in run["metrics"].values() if v is not None)


ALL_METHODS = sorted(__import__("cpt_bench.training.plugin", fromlist=["registered_methods"]).registered_methods())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_runs_two_stages_on_a_decoder(tiny_suite, decoder_dirs, tmp_path, family, method):
    out = tmp_path / "out"
    result = run_cli("run", "--method", method, "--suite", str(decoder_suite(tiny_suite, decoder_dirs[family])),
                     "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    run = json.loads(next(out.glob("*.json")).read_text())
    assert all(math.isfinite(v) for v in run["metrics"].values() if v is not None)
    assert len(run["stages"]) == (0 if method == "base" else 1 if method == "joint" else 2)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_on_a_gqa_swiglu_decoder_resumes_after_a_crash_to_the_same_result(
        tiny_suite, decoder_dirs, tmp_path, monkeypatch, method):
    from interruptions import assert_same_result, crash_at_batch, crash_then_resume, only_result, run_tiny

    suite = decoder_suite(tiny_suite, decoder_dirs["llama"])
    reference = run_tiny(suite, tmp_path / "reference", method)
    assert reference.exit_code == 0, reference.output
    reference = only_result(tmp_path / "reference")
    assert all(math.isfinite(v) for v in reference["metrics"].values() if v is not None)
    if method == "base":
        return  # no DAP stage to interrupt
    # the crash comes in the second stage (joint: late in its one stage)
    resumed = crash_then_resume(suite, tmp_path / "crashed", method, monkeypatch,
                                lambda: crash_at_batch(monkeypatch, 9))
    assert_same_result(resumed, reference)


def test_a_checkpoint_that_is_neither_a_masked_nor_a_causal_lm_is_one_line(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    with pytest.raises(BadInput, match="'vit' checkpoint is neither a masked nor a causal LM"):
        load_lm(str(tmp_path / "vit"))


def test_a_decoder_without_an_end_of_text_token_is_one_line(decoder_dirs, tmp_path):
    import shutil

    folder = tmp_path / "no-eos"
    shutil.copytree(decoder_dirs["gpt2"], folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text())
            data.pop("eos_token", None)
            path.write_text(json.dumps(data))
    with pytest.raises(BadInput, match="no end-of-text token"):
        load_lm(str(folder))


def _prompt_task(tokenizer, verbalizer):
    from cpt_bench.data.texts import EndTaskData, EndTaskSplit

    split = EndTaskSplit(["the cats was", "a dogs is"], None, [1, 0], "fixture")
    return EndTaskData("fixture", ["neg", "pos"], split, split, None, "macro", {}, evaluator="prompt",
                       template="{text} {mask} .", verbalizer=verbalizer)


def test_prompt_scoring_ranks_a_constructed_example_and_sums_a_multi_token_word(decoder_dirs):
    from cpt_bench.data.texts import encode_split
    from cpt_bench.evaluation.evaluator import CausalPromptClassifier, verbalizer_continuations

    model, tokenizer = load_lm(str(decoder_dirs["gpt2"]))
    model.eval()
    good, very, bad = tokenizer.convert_tokens_to_ids(["good", "very", "bad"])
    with torch.no_grad():  # every hidden state becomes the same vector, and "good" is its best continuation
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.linspace(-1, 1, model.config.n_embd))
        model.transformer.wte.weight[good] = 8 * model.transformer.ln_f.bias
    task = _prompt_task(tokenizer, {"neg": ["very bad"], "pos": ["good"]})
    continuations = verbalizer_continuations(tokenizer, task)
    assert continuations == [[[very, bad]], [[good]]]  # a two-token word is kept whole
    batch = encode_split(tokenizer, task.test, 16, task.template, causal=True)
    with torch.no_grad():
        scores = CausalPromptClassifier(model, continuations, tokenizer.pad_token_id)(
            batch["input_ids"], batch["attention_mask"])
    assert scores.argmax(-1).tolist() == [1, 1]  # "good" wins for both examples
    with torch.no_grad():  # the two-token word's score is the sum of its tokens' log-probabilities
        text = tokenizer(["the cats was very bad"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        log_probs = model(input_ids=text).logits.float().log_softmax(-1)[0]
        expected = log_probs[2, very] + log_probs[3, bad]
    assert float(scores[0, 0]) == pytest.approx(float(expected), abs=1e-4)


def test_the_prompt_evaluator_fine_tunes_a_decoder_end_to_end(tiny_suite, decoder_dirs, tmp_path):
    suite = decoder_suite(tiny_suite, decoder_dirs["llama"])
    config = yaml.safe_load(suite.read_text())
    for domain in config["domains"]:
        domain["end_task"].update(evaluator="prompt", prompt={
            "template": "{text} it was {mask} .", "verbalizer": {"neg": ["bad", "very bad"], "pos": ["good"]}})
    suite.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(suite), "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    run = json.loads(next(out.glob("*.json")).read_text())
    assert "prompt" in run["settings"]["end_tasks"]["cats"]["evaluator"]
    assert all(0.0 <= v <= 1.0 for v in run["matrix"]["macro_f1"][-1])


def test_a_decoders_prompt_with_the_text_after_the_mask_is_one_line(tiny_suite, decoder_dirs, tmp_path):
    suite = decoder_suite(tiny_suite, decoder_dirs["gpt2"])
    config = yaml.safe_load(suite.read_text())
    config["domains"][0]["end_task"].update(evaluator="prompt", prompt={
        "template": "{mask} : {text}", "verbalizer": {"neg": ["bad"], "pos": ["good"]}})
    suite.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(suite), "--output", str(out))
    assert_one_line_error(result, "needs {text} before {mask}")
    assert not out.exists() or not list(out.glob("*.json"))


# ---------------------------------------------------------------- units of decoder families

def _layer0_units(units, model, batch):
    """Layer 0's unit outputs: merged heads [.., heads, head_dim], intermediate neurons, output neurons."""
    seen = {}
    layer = units.layers[0]
    handles = [layer.attention_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0])),
               layer.output_dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("intermediate", a[0])),
               layer.output_dense.register_forward_hook(lambda m, a, o: seen.__setitem__("output", o))]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    seen["head"] = seen["head"].view(*seen["head"].shape[:-1], units.num_heads, units.head_dim)
    return seen


def _decoder_batch(model_dir):
    model, tokenizer = load_lm(str(model_dir))
    model.eval()
    blocks = causal_blocks(TEXTS * 4, tokenizer, 8, "fixture")
    return model, MaskingCollator(tokenizer)([blocks[i] for i in range(3)])


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_at_one_leave_a_decoder_bitwise_unchanged(decoder_dirs, family):
    from cpt_bench.models.units import UnitMap

    model, batch = _decoder_batch(decoder_dirs[family])
    units = UnitMap(model)
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with units.gated(units.ones()):
            gated = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(plain, gated)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["head", "intermediate", "output"])
def test_perturbing_a_units_owned_slices_changes_only_that_unit(decoder_dirs, family, kind):
    """Including grouped-query attention (llama: 4 query heads, 2 key/value heads) and SwiGLU: a key/value
    head's rows belong to its group, so no single query head owns them."""
    from cpt_bench.models.units import UnitMap

    model, batch = _decoder_batch(decoder_dirs[family])
    units = UnitMap(model)
    unit = 1
    before = _layer0_units(units, model, batch)
    one_hot = torch.zeros(units.sizes[kind])
    one_hot[unit] = 1.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter, owner, layer, axis in units.unit_parameters():
            if owner != kind or layer != 0:
                continue
            owned = units.parameter_scale(one_hot, kind, parameter, axis).expand_as(parameter) > 0
            parameter.add_(torch.randn(parameter.shape, generator=generator) * owned)
    after = _layer0_units(units, model, batch)
    difference = (after[kind] - before[kind]).abs()
    if kind == "head":  # [batch, time, heads, head_dim] -> per head
        difference = difference.amax(-1)
    changed = difference.flatten(0, 1).amax(0) > 0  # per unit
    assert changed[unit]
    assert not torch.cat([changed[:unit], changed[unit + 1:]]).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_zeroed_unit_has_zero_importance(decoder_dirs, family):
    from cpt_bench.models.units import UNIT_KINDS, UnitMap

    model, batch = _decoder_batch(decoder_dirs[family])
    units = UnitMap(model)
    with torch.no_grad():  # zero what every unit of each kind sends on: unit 0 of layer 0 falls silent
        for parameter, kind, layer, axis in units.unit_parameters():
            one_hot = torch.zeros(units.sizes[kind])
            one_hot[0] = 1.0
            owned = units.parameter_scale(one_hot, kind, parameter, axis).expand_as(parameter) > 0
            silences = (kind == "head" and axis == (0 if family == "gpt2" else 1)) or kind != "head"
            if layer == 0 and silences:
                parameter.masked_fill_(owned, 0.0)
    gates = {k: v.requires_grad_(True) for k, v in units.ones().items()}
    with units.gated(gates):
        loss = lm_loss(model, batch)
    grads = dict(zip(UNIT_KINDS, torch.autograd.grad(loss, [gates[k] for k in UNIT_KINDS]), strict=True))
    for kind in UNIT_KINDS:
        assert grads[kind][0, 0] == 0, kind
        assert grads[kind][0, 1:].abs().sum() > 0, kind


def test_the_general_proxy_is_not_zero_on_a_decoder_without_dropout(decoder_dirs):
    from accelerate import Accelerator

    from cpt_bench.models.loading import has_dropout
    from cpt_bench.training.plugin import method_class
    from cpt_bench.training.stage import SequenceState

    from conftest import stage_state

    model, tokenizer = load_lm(str(decoder_dirs["llama"]))
    assert not has_dropout(model)  # Llama ships without dropout: two plain passes are identical
    method = method_class("softmask")()
    method.before_sequence(SequenceState(model, tokenizer, Accelerator(cpu=True), ["cats"], 0))
    blocks = causal_blocks(TEXTS * 8, tokenizer, 8, "fixture")
    state = stage_state(model, blocks, tokenizer=tokenizer)
    raw = method._importance(state, general=True)
    assert all(values.abs().sum() > 0 for values in raw.values())


def test_a_decoder_family_without_a_unit_map_is_one_line_for_the_methods_that_need_one(tiny_suite, tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    from cpt_bench.running.synthetic import build_tokenizer

    tokenizer = build_tokenizer(sorted(set(FILLER) | set(WORDS) | {w for p in WORDS.values() for g in p for w in g}),
                                64, causal=True)
    folder = tmp_path / "opt"
    config = OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    suite = decoder_suite(tiny_suite, folder)
    for method in ("softmask", "adapter", "lora", "demix"):
        result = run_cli("run", "--method", method, "--suite", str(suite), "--output", str(tmp_path / method))
        assert_one_line_error(result, "'opt' has no unit map")


def test_das6_runs_with_a_llama_style_decoder(tmp_path, decoder_dirs, monkeypatch):
    """The paper's suite with any causal LM: here a tiny random Llama-style config saved to a folder."""
    from test_das6 import write_das6

    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    root = write_das6(tmp_path / "data", ["acl", "restaurant"])
    for name in ("acl", "restaurant"):  # words the tiny tokenizer knows, so DAP trains on more than [UNK]
        corpus = root / name / "unlabeled.jsonl"
        corpus.write_text(json.dumps({"text": "the cats was purr and the dogs was bark ."}) + "\n" +
                          corpus.read_text())
    result = run_cli("run", "--method", "softmask", "--suite", "das6", "--data-dir", str(root),
                     "--order", "acl,restaurant", "--model", str(decoder_dirs["llama"]), "--steps", "2",
                     "--eval", "final", "--set", "dap.seq_len=8", "--set", "dap.batch_size=4",
                     "--set", "dap.grad_accum=1", "--set", "finetune.max_length=48",
                     "--output", str(tmp_path / "runs"), "--quiet")
    assert result.exit_code == 0, result.output
    run = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert run["domains"] == ["acl", "restaurant"] and run["perplexity"]["objective"] == "causal"
    assert all(0.0 <= v <= 1.0 for v in run["matrix"]["macro_f1"][-1])


def test_bench_times_a_decoder_against_the_trainer_with_its_causal_collator(tiny_suite, decoder_dirs, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--suite", str(tiny_suite), "--model", str(decoder_dirs["gpt2"]), "--steps", "2",
                     "--repeats", "1", "--device", "cpu", "--json", str(out))
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text())
    assert numbers["step_ms"]["hf_trainer"] > 0 and numbers["step_ms"]["naive"] > 0
    assert numbers["step_ms"]["softmask"] > 0


def test_a_head_warmup_is_refused_on_a_decoder_with_one_line(tiny_suite, decoder_dirs, tmp_path):
    config = yaml.safe_load(tiny_suite.read_text())
    config["head_warmup"] = {"steps": 2}
    tiny_suite.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--model", str(decoder_dirs["gpt2"]),
                     "--output", str(out))
    assert_one_line_error(result, "head_warmup is for a masked LM", "is a decoder")
    assert not out.exists() or not list(out.glob("*.json"))
