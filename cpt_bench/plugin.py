"""The method plugin interface: a method is an object that acts at named events of the shared trainer.

The trainer (cpt_bench.trainer) and the runner (cpt_bench.runner) call these hooks and nothing else; they
never ask which method is running. Register a method with `@register` in a file under `methods/` or
`baselines/`; the registry imports every file there.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from cpt_bench.errors import BadInput

if TYPE_CHECKING:
    from cpt_bench.trainer import StageState


@dataclasses.dataclass
class NoSettings:
    """A method without hyperparameters of its own."""


@dataclasses.dataclass
class Stage:
    """One DAP stage: a name (the domain, usually) and the corpora it trains on."""

    name: str
    corpora: list[str]
    steps_scale: int = 1  # multiplies the suite's steps per domain (a joint stage trains on T corpora)


@dataclasses.dataclass
class SequenceState:
    """What a method sees when the domain sequence starts."""

    model: nn.Module
    tokenizer: Any
    accelerator: Any
    domains: list[str]
    seed: int


class Method:
    """Base class: continual DAP with no protection. Subclasses override the events they need."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    trains_lm: ClassVar[bool] = True  # False: no DAP at all (the `base` reference)

    def __init__(self, settings: Any = None):
        self.settings = settings if settings is not None else self.Settings()

    # ---- planning
    def plan_stages(self, domains: list[str]) -> list[Stage]:
        """The DAP stages of the run, in order (default: one stage per domain)."""
        return [Stage(name=d, corpora=[d]) for d in domains]

    def end_tasks_after_stage(self, stage_index: int, scheduled: list[int]) -> list[int]:
        """Which end-task columns to evaluate after a stage (default: what the evaluation schedule says)."""
        return scheduled

    # ---- events of the trainer, in the order they run
    def on_sequence_start(self, run: SequenceState) -> None:
        """Once, before the first stage (e.g. snapshot the original weights, general importance)."""

    def observe_end_task(self, column: int, texts: list[str]) -> None:
        """Once per end task, after `on_sequence_start`: the task's training texts (raw, no prompt template),
        for a method that adapts the LM to a task's text (e.g. a domain posterior estimated on them)."""

    def prepare_stage(self, model: nn.Module, stage: Stage, stage_index: int) -> None:
        """Before the stage's optimizer is built: add, select or freeze modules (a new adapter or expert)."""

    def before_domain(self, stage: StageState) -> None:
        """Before a stage's first step (the optimizer already exists)."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the stage's optimizer updates."""
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, stage: StageState, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one micro-batch (default: masked-LM loss)."""
        return stage.objective(**batch)

    def after_backward(self, stage: StageState) -> None:
        """Gradients are complete (and unscaled), before clipping and the optimizer step."""

    def after_optimizer_step(self, stage: StageState) -> None:
        """Right after the optimizer changed the parameters."""

    def after_domain(self, stage: StageState) -> None:
        """After a stage's last step (e.g. importance or Fisher of the domain just learned)."""

    def end_task_lm(self, model: nn.Module, column: int) -> nn.Module:
        """The LM fine-tuned for end task `column` (default: the LM). The evaluator works on a copy and trains
        the copy's parameters that have `requires_grad` (plus the fresh head of a head evaluator), so a method
        that fine-tunes only its own modules (an adapter) returns an LM with everything else frozen."""
        return model

    def probe_lm(self, model: nn.Module) -> nn.Module:
        """The LM whose general knowledge the suite's probes measure after a stage (default: the LM)."""
        return model

    def overhead(self, model: nn.Module) -> dict[str, int]:
        """Memory a method keeps beyond the plain LM and its AdamW state, in counts of numbers (elements):
        `extra_parameters` (added modules), `extra_optimizer_state` (beyond AdamW's two moments of the trained
        parameters), `buffers` (snapshots, Fisher, replay data, importances). Recorded in the result file."""
        return {"extra_parameters": 0, "extra_optimizer_state": 0, "buffers": 0}

    # ---- results and checkpoints
    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named tensor collections saved beside the result file as `<result>.<name>.safetensors`."""
        return {}

    def summary(self) -> dict[str, Any]:
        """JSON-able facts about the run (choices the method made), written under `method_summary`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


METHODS: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or not cls.description:
        raise TypeError(f"{cls.__name__} needs a name and a description")
    for key in (cls.name, *cls.aliases):
        if key in METHODS or key in _ALIASES:
            raise TypeError(f"method name {key!r} registered twice")
    METHODS[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


BROKEN_PLUGINS: dict[str, str] = {}  # plugin module -> why it failed to import


def load_plugins() -> None:
    """Import every plugin file under cpt_bench.methods and cpt_bench.baselines (registration is a side effect).

    A plugin that fails to import is recorded, not raised: one broken file must not take every method down."""
    for package_name in ("cpt_bench.baselines", "cpt_bench.methods"):
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            module = f"{package_name}.{info.name}"
            if module in BROKEN_PLUGINS:
                continue
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001 - any import-time failure of a third-party plugin
                BROKEN_PLUGINS[module] = f"{type(error).__name__}: {error}".splitlines()[0]


def method_class(name: str) -> type[Method]:
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
