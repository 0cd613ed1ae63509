"""Typed settings blocks (DAP, fine-tuning, each method's) built from YAML or `--set`, validated once."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import yaml

from cpt_bench.common.errors import BadInput

FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class Validated:
    """A settings block (a dataclass) that checks its values once, where it is built (`build`)."""

    def check(self, where: str) -> None:
        """Raise BadInput naming `where` and the field if a value is out of range (default: nothing to check)."""


@dataclasses.dataclass
class DapSettings(Validated):
    """Domain-adaptive pre-training (masked LM) of one stage."""

    steps: int = 200
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 5e-4
    warmup: float = 0.1  # fraction of the stage's optimizer steps
    weight_decay: float = 0.01
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mlm_probability: float = 0.15
    precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = False  # torch.compile the encoder for DAP (opt-in: the first steps pay for compiling)
    # the MLM decoder's vocabulary padded to a multiple of this for aligned GEMMs (same logits; 0: 64 on a GPU,
    # none on a CPU)
    vocab_pad_multiple: int = 0
    # the learning rate within a stage (formulas: cpt_bench/training/optim.py lr_factor, and the README)
    schedule: Literal["linear", "cosine", "constant", "wsd", "rsqrt"] = "linear"
    rewarm: bool = True  # warm up at every stage; False: only at the first (later stages start at the peak)
    final_lr_fraction: float = 0.0  # the learning rate at the end of a stage, as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: the last fraction of the stage's steps over which the rate decays
    # AdamW's moments at a new stage: "reset" (fresh), or "carry" them over from the previous stage when the
    # method trains the same parameters there (else reset; the result's stage records say which)
    optimizer_state: Literal["reset", "carry"] = "reset"
    # a stage's budget in tokens instead of steps (0: `steps` decides): planning turns it into
    # ceil(tokens / (batch_size * seq_len * grad_accum)) optimizer steps, each reading that many tokens
    tokens: int = 0

    def check(self, where: str) -> None:
        non_negative(where, tokens=self.tokens)
        positive(where, steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                 grad_accum=self.grad_accum)
        fraction(where, final_lr_fraction=self.final_lr_fraction)
        if not 0.0 < self.decay_fraction <= 1.0:
            raise BadInput(f"{where}.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.seq_len < 8:
            raise BadInput(f"{where}.seq_len: must be at least 8, got {self.seq_len}")
        fraction(where, warmup=self.warmup, mlm_probability=self.mlm_probability)
        if self.lr <= 0:
            raise BadInput(f"{where}.lr: must be positive, got {self.lr}")
        if self.vocab_pad_multiple < 0:
            raise BadInput(f"{where}.vocab_pad_multiple: must be 0 (automatic) or positive, "
                           f"got {self.vocab_pad_multiple}")
        non_negative(where, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)


# DAP settings added after result files were first named: left out of a run's and a suite's hash while at their
# defaults, so that earlier runs keep their file names
DAP_SETTINGS_ADDED_LATER = ("schedule", "rewarm", "final_lr_fraction", "decay_fraction", "optimizer_state",
                            "tokens")


def hashed_dap_settings(dap: dict[str, Any]) -> dict[str, Any]:
    """A DAP settings block as it enters a hash (see DAP_SETTINGS_ADDED_LATER)."""
    defaults = DapSettings()
    return {key: value for key, value in dap.items()
            if not (key in DAP_SETTINGS_ADDED_LATER and value == getattr(defaults, key))}


@dataclasses.dataclass
class FinetuneSettings(Validated):
    """End-task fine-tuning of a fresh classification head on top of an LM state."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float = 1.0

    def check(self, where: str) -> None:
        positive(where, epochs=self.epochs, batch_size=self.batch_size, max_length=self.max_length)
        fraction(where, warmup=self.warmup)
        non_negative(where, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)
        if self.lr <= 0:
            raise BadInput(f"{where}.lr: must be positive, got {self.lr}")


@dataclasses.dataclass
class DataSettings(Validated):
    """What a run does to its data before training."""

    # drop every DAP corpus text that shares a 13-gram with a test text of the run's end tasks and probes
    # (cpt_bench/data/audit.py); the number dropped per corpus is recorded in the result's provenance
    decontaminate: bool = False


def value_when_absent(field: dataclasses.Field) -> Any:
    """What a result file written before `field` existed ran with: its `absent_means` metadata where a later
    version changed the behaviour when it added the setting, else its default."""
    if "absent_means" in field.metadata:
        return field.metadata["absent_means"]
    if field.default is not dataclasses.MISSING:
        return field.default
    return None if field.default_factory is dataclasses.MISSING else field.default_factory()


def positive(where: str, **values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise BadInput(f"{where}.{name}: must be positive, got {value}")


def non_negative(where: str, **values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise BadInput(f"{where}.{name}: must be 0 or positive (0: off), got {value}")


def fraction(where: str, **values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise BadInput(f"{where}.{name}: must be in [0, 1], got {value}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a type hint (int, float, str, bool, Literal, Optional, list[...])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        present = [o for o in options if o is not type(None)]
        if len(present) == 1:  # Optional[X]: X's own error names the field that is wrong
            return coerce(value, present[0], where)
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except BadInput:
                pass
        raise BadInput(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise BadInput(f"{where}: expected one of {_type_name(annotation)}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation) or (Any,)
        if not isinstance(value, list):
            raise BadInput(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInput(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        return {coerce(k, key_type, where): coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no setting means anything at inf or nan; they surface mid-run
                raise BadInput(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str) and FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string; users write it that way
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)
    else:
        raise TypeError(f"unsupported settings type {annotation!r} at {where}")
    raise BadInput(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys, missing required keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise BadInput(f"{where}: missing required key {name!r}")
    obj = cls(**kwargs)
    if isinstance(obj, Validated):
        obj.check(where)
    return obj


def override(obj: Any, key: str, raw_value: str, where: str) -> Any:
    """Return a copy of dataclass `obj` with field `key` set from a `--set` string (parsed as YAML)."""
    fields = {f.name for f in dataclasses.fields(obj)}
    if key not in fields:
        raise BadInput(f"--set {where}.{key}: unknown key (known: {', '.join(sorted(fields))})")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError:
        value = raw_value
    data = dataclasses.asdict(obj)
    data[key] = value
    return build(type(obj), data, f"--set {where}")


def parse_set_options(options: list[str]) -> dict[str, dict[str, str]]:
    """Split `--set a.b=c` options into {'a': {'b': 'c'}}; the first dotted part names the block."""
    grouped: dict[str, dict[str, str]] = {}
    for option in options:
        key, sep, value = option.partition("=")
        block, dot, name = key.strip().partition(".")
        if not sep or not dot or not block or not name:
            raise BadInput(f"--set {option!r}: expected BLOCK.KEY=VALUE, e.g. dap.steps=100")
        grouped.setdefault(block, {})[name] = value.strip()
    return grouped


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
