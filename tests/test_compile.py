"""`dap.compile=true` (opt-in torch.compile of the encoder) trains the same weights as the eager step: same
losses and parameters up to float reassociation, on the plain model (nothing compiled is left behind)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cpt_bench.common.settings import DapSettings
from cpt_bench.training.plugin import Method
from cpt_bench.training.stage import SequenceState, Stage
from cpt_bench.training.trainer import DapTrainer

TEXTS = [f"the cats was {a} and {b} ." for a in ("purr", "nap", "soft", "calm") for b in ("hiss", "bite")]


@pytest.mark.slow
def test_compiled_stage_matches_the_eager_one(tiny_lm):
    from accelerate import Accelerator

    tokenizer = tiny_lm.tokenizer
    blocks = tiny_lm.blocks(TEXTS * 4, "cats")
    eager_settings = DapSettings(steps=3, batch_size=4, seq_len=16, lr=1e-2, mlm_probability=0.3)

    def train(settings):
        model = tiny_lm.model()
        for module in model.modules():  # compiled dropout draws other random numbers: compare without it
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.config.attention_probs_dropout_prob = 0.0
        accelerator = Accelerator(cpu=True)
        method = Method()
        method.before_sequence(SequenceState(model, tokenizer, accelerator, ["cats"], 0))
        trainer = DapTrainer(accelerator, tokenizer, settings, method, seed=0, show_progress=False)
        record = trainer.train_stage(model, blocks, Stage("cats", ["cats"]), 0)
        return record.loss_curve, model

    eager_losses, eager = train(eager_settings)
    compiled_losses, compiled = train(dataclasses.replace(eager_settings, compile=True))
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # no compiled wrapper in the weights
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, atol=1e-4, rtol=1e-4)
    assert type(compiled.base_model).__name__ == type(eager.base_model).__name__  # the LM itself stays plain
