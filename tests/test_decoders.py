"""Causal LMs (decoders): loading, next-token blocks, the shared loss against the model's own, held-out
perplexity and bits per byte, end-to-end runs on tiny random GPT-2, GPT-NeoX and Llama configs built here."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cpt_bench.batches import MaskingCollator, causal_blocks
from cpt_bench.errors import BadInput
from cpt_bench.models import is_causal_lm, load_lm, mlm_loss
from cpt_bench.results import validate_result

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

    from cpt_bench.synthetic import build_tokenizer

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
    ours = mlm_loss(model, batch)
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

    from cpt_bench.perplexity import heldout_scores

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


@pytest.mark.parametrize("method", ["one", "joint", "base", "ewc", "kd", "derpp"])
def test_every_loss_based_method_runs_on_a_decoder(tiny_suite, decoder_dirs, tmp_path, method):
    out = tmp_path / "out"
    result = run_cli("run", "--method", method, "--suite", str(decoder_suite(tiny_suite, decoder_dirs["llama"])),
                     "--output", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    run = json.loads(next(out.glob("*.json")).read_text())
    assert all(math.isfinite(v) for v in run["metrics"].values() if v is not None)


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


def test_the_prompt_evaluator_on_a_decoder_is_one_line_before_training(tiny_suite, decoder_dirs, tmp_path):
    suite = decoder_suite(tiny_suite, decoder_dirs["gpt2"])
    config = yaml.safe_load(suite.read_text())
    config["domains"][0]["end_task"].update(evaluator="prompt", prompt={
        "template": "{text} it was {mask} .", "verbalizer": {"neg": ["bad"], "pos": ["good"]}})
    suite.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_cli("run", "--method", "naive", "--suite", str(suite), "--output", str(out))
    assert_one_line_error(result, "evaluator 'prompt'", "causal LM")
    assert not out.exists() or not list(out.glob("*.json"))
