"""The method contract: a method is an object that acts at named events of the shared trainer and runner.

The trainer (cpt_bench.training.trainer) and the runner (cpt_bench.running.runner) call these and nothing else;
they never ask which method is running. A method is a `Method` subclass in its own file under `methods/` or
`baselines/`, registered with `@register`; the registry imports every file there. `methods/TEMPLATE.md` walks
through one.

Events (`before_*` / `after_*`), in the order they run:

    before_sequence(sequence)        once, before the first stage; sees the original LM
    for each stage of `plan_stages`:
        before_stage(stage)          before the stage's optimizer exists: add, select or freeze modules
        before_first_step(stage)     the optimizer exists; nothing trained yet in this stage
        every optimizer step: loss(stage, batch) for each micro-batch, then after_backward(stage),
                                     then after_optimizer_step(stage)
        after_stage(stage)           after the last step
        the stage's evaluation asks end_tasks_to_evaluate, end_task_model and probe_model

Queries (`plan_stages`, `trainable_parameters`, `loss`, `end_task_model`, `probe_model`, `overhead`,
`summary`, `artifacts`, `state_dict`) return a value; they are asked at the moments their docstrings say.

Resume. A checkpoint holds the LM's weights, the trainer's state and `state_dict()`; it is taken at the end of
every stage (after `after_stage`) and every `--checkpoint-every` steps inside a stage. A resumed run builds a
fresh method and calls, in this order: `before_sequence` (with the original LM, exactly as in a fresh run),
`load_state_dict` (with what `state_dict` returned at the checkpoint), then the LM's weights are loaded. So a
method builds its objects in `before_sequence` and restores into them: no pending state. Then:

- from a checkpoint at a stage's end, the next stage starts as it would have: nothing differs;
- from a checkpoint inside stage k, stage k is re-entered: `before_stage` and `before_first_step` run again
  with `stage.resumed` True, the weights, optimizer, schedule, step count and random state already as they
  were at the checkpoint. Redo what builds per-stage objects; do not redo what happened once at the stage's
  real start (a snapshot of the weights, an importance pass): its result is in the restored state.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar

import torch
from torch import nn

from cpt_bench.common.errors import BadInput
from cpt_bench.common.settings import Validated
from cpt_bench.training.stage import SequenceState, Stage, StageState


@dataclasses.dataclass
class MethodSettings(Validated):
    """Base of a method's settings: a dataclass whose fields (with defaults) are set with
    `--set METHOD.FIELD=VALUE` and recorded in the result's `method_config`. Override `check` to refuse bad
    values with a one-line BadInput."""


class Method:
    """Base class: continual DAP with no protection. Subclasses override the events they need."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""  # one line for `cpt-bench list methods`
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    trains_lm: ClassVar[bool] = True  # False: no DAP at all (the `base` reference)
    # True: acts on attention heads and FFN neurons (cpt_bench.models.units), so a model family without a unit map is
    # refused when the run is planned, before any training
    needs_unit_map: ClassVar[bool] = False
    # True: trains through the standard loss and optimizer only, nothing that needs a parameter whole (per-unit
    # slices, per-parameter Fisher, weight copies), so it runs with parameters sharded by FSDP; False: refused there
    supports_fsdp: ClassVar[bool] = False

    def __init__(self, settings: MethodSettings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    # ---- planning
    def plan_stages(self, domains: list[str]) -> list[Stage]:
        """The DAP stages of the run, in order (default: one stage per domain)."""
        return [Stage(name=d, corpora=[d]) for d in domains]

    def end_tasks_to_evaluate(self, stage_index: int, scheduled: list[int]) -> list[int]:
        """Which domains' end tasks to evaluate after a stage (default: what `--eval` schedules)."""
        return scheduled

    # ---- events, in the order they run
    def before_sequence(self, sequence: SequenceState) -> None:
        """Once, before the first stage, with the original LM (also on resume, before `load_state_dict`)."""

    def before_stage(self, stage: StageState) -> None:
        """Before the stage's optimizer is built (`stage.optimizer` is None): add, select or freeze modules."""

    def before_first_step(self, stage: StageState) -> None:
        """The stage's optimizer exists, no step taken yet in it (or, when `stage.resumed`, restored)."""

    def after_backward(self, stage: StageState) -> None:
        """Gradients of the step are complete (and unscaled), before clipping and the optimizer step."""

    def after_optimizer_step(self, stage: StageState) -> None:
        """Right after the optimizer changed the parameters."""

    def after_stage(self, stage: StageState) -> None:
        """After the stage's last step, before its checkpoint and evaluation."""

    # ---- queries
    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the stage's optimizer updates (asked after `before_stage`)."""
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, stage: StageState, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one micro-batch: `stage.lm_loss(batch)` (which logs the term "mlm") plus any
        term of the method's own, each logged with `stage.log_term(name, value)`."""
        return stage.lm_loss(batch)

    def end_task_model(self, model: nn.Module, domain_index: int) -> nn.Module:
        """The LM fine-tuned for domain `domain_index`'s end task (default: the LM). The evaluator works on a
        copy and trains the copy's parameters that have `requires_grad` (plus the fresh head of a head
        evaluator), so a method that fine-tunes only its own modules (an adapter) freezes everything else."""
        return model

    def probe_model(self, model: nn.Module) -> nn.Module:
        """The LM whose general knowledge the suite's probes measure after a stage (default: the LM)."""
        return model

    def overhead(self, model: nn.Module) -> dict[str, int]:
        """Memory a method keeps beyond the plain LM and its AdamW state, in numbers (elements), recorded in the
        result file: `extra_parameters` (added modules), `extra_optimizer_state` (beyond AdamW's two moments of
        the trained parameters), `buffers` (snapshots, Fisher, replay data, importances). Default: every
        tensor of `state_dict()` is a buffer (tied or shared tensors counted once)."""
        return {"extra_parameters": 0, "extra_optimizer_state": 0, "buffers": tensor_elements(self.state_dict())}

    def summary(self) -> dict[str, Any]:
        """JSON-able facts about the run (choices the method made), written under `method_summary`."""
        return {}

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named tensor collections saved beside the result file as `<result>.<name>.safetensors`."""
        return {}

    # ---- checkpoints (see "Resume" above)
    def state_dict(self) -> dict[str, Any]:
        """Everything the method needs to continue: nested dicts, lists and tuples of tensors, numbers and
        strings (saved as safetensors and JSON, never pickled)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state` (a `state_dict()` of an earlier process) into the objects `before_sequence` built."""


def tensor_elements(tree: Any) -> int:
    """Numbers held by the tensors of a nested state; a storage shared by several entries counts once."""
    seen: set[tuple[int, int]] = set()

    def visit(node: Any) -> int:
        if isinstance(node, torch.Tensor):
            key = (node.data_ptr(), node.numel())
            if node.numel() == 0 or key in seen:
                return 0
            seen.add(key)
            return node.numel()
        if isinstance(node, dict):
            return sum(visit(v) for v in node.values())
        if isinstance(node, (list, tuple)):
            return sum(visit(v) for v in node)
        return 0

    return visit(tree)


# ---------------------------------------------------------------- the registry

METHODS: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}
BROKEN_PLUGINS: dict[str, str] = {}  # plugin module -> why it failed to import
PLUGIN_PACKAGES = ("cpt_bench.baselines", "cpt_bench.methods")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its name and aliases."""
    if not cls.name or not cls.description:
        raise TypeError(f"{cls.__name__} needs a name and a description")
    settings = cls.Settings
    if not (dataclasses.is_dataclass(settings) and issubclass(settings, MethodSettings)):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass subclassing MethodSettings")
    for key in (cls.name, *cls.aliases):
        if key in METHODS or key in _ALIASES:
            raise TypeError(f"method name {key!r} registered twice")
    METHODS[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def load_plugins() -> None:
    """Import every plugin file under cpt_bench.methods and cpt_bench.baselines (registration is a side effect).

    A plugin that fails to import is recorded, not raised: one broken file must not take every method down."""
    for package_name in PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            module = f"{package_name}.{info.name}"
            if module in BROKEN_PLUGINS:
                continue
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001 - any import-time failure of a third-party plugin
                BROKEN_PLUGINS[module] = f"{type(error).__name__}: {error}".splitlines()[0]


def registered_methods() -> dict[str, type[Method]]:
    """Every registered method by name (plugins imported first)."""
    load_plugins()
    return dict(METHODS)


def method_class(name: str) -> type[Method]:
    """The method registered under `name` (or an alias); a one-line BadInput otherwise."""
    load_plugins()
    canonical = _ALIASES.get(name, name)
    if canonical not in METHODS:
        broken = [f"{module} ({why})" for module, why in BROKEN_PLUGINS.items()
                  if module.rsplit(".", 1)[1] == name]
        if broken:
            raise BadInput(f"method {name!r} failed to load: {broken[0]}")
        also = f"; plugins that failed to load: {', '.join(sorted(BROKEN_PLUGINS))}" if BROKEN_PLUGINS else ""
        raise BadInput(f"unknown method {name!r} (registered: {', '.join(sorted(METHODS))}){also}")
    return METHODS[canonical]
