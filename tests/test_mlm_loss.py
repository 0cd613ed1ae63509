"""The masked-LM loss of our step: logits only at the masked positions, optionally from a padded decoder, give the
model's own full-logits loss and its gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from cpt_bench.models.loading import lm_loss_and_hidden, vocab_pad_multiple

SIZES = {"vocab_size": 71, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0}


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(**SIZES))
    return RobertaForMaskedLM(RobertaConfig(**SIZES, pad_token_id=1))


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, SIZES["vocab_size"], (4, 24), generator=generator)
    labels = torch.where(torch.rand(input_ids.shape, generator=generator) < 0.3, input_ids, -100)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _loss_and_gradients(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pad_multiple", [1, 64])
def test_masked_position_loss_is_the_models_full_logits_loss(kind, pad_multiple):
    model, batch = _model(kind), _batch()
    expected, expected_grads = _loss_and_gradients(model, lambda m: m(**batch).loss)
    loss, grads = _loss_and_gradients(model, lambda m: lm_loss_and_hidden(m, batch, vocab_pad=pad_multiple)[0])
    torch.testing.assert_close(loss, expected)
    assert grads.keys() == expected_grads.keys()  # the tied decoder/bias get their gradient through the padding
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)
    # the padding lives only inside the step: the model keeps its vocabulary
    assert model.get_output_embeddings().weight.shape[0] == SIZES["vocab_size"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_vocabulary_is_padded_on_a_gpu_only_unless_asked():
    assert vocab_pad_multiple(0, torch.device("cpu")) == 1  # CPU results stay those of the unpadded decoder
    assert vocab_pad_multiple(0, torch.device("cuda")) == 64
    assert vocab_pad_multiple(8, torch.device("cpu")) == 8


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_rows_with_nothing_masked_give_a_zero_loss_with_a_gradient_for_every_parameter(kind):
    """Several processes reduce their gradients bucket by bucket: a process whose rows have no masked position
    must still give every parameter (the MLM head's too) a gradient, zero, or the processes fall out of step."""
    model, batch = _model(kind), _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    normal = set(_loss_and_gradients(model, lambda m: lm_loss_and_hidden(m, _batch())[0])[1])
    loss, grads = _loss_and_gradients(model, lambda m: lm_loss_and_hidden(m, batch)[0])
    assert loss.item() == 0.0
    assert set(grads) == normal
    assert all(grad.abs().max() == 0 for grad in grads.values())
