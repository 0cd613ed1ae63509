"""The method contract (cpt_bench/training/plugin.py), checked on every registered method and on the example method of
methods/TEMPLATE.md. Methods are discovered through the registry: a new method is tested without being listed
anywhere."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys
import typing
from pathlib import Path

import pytest
import torch

from cpt_bench.running.results import validate_result
from cpt_bench.training.checkpoint import load_state, save_state
from cpt_bench.training.plugin import METHODS, method_class, registered_methods
from cpt_bench.training.stage import SequenceState

from interruptions import Crash, assert_same_result, crash_at_batch, only_result, run_tiny

TEMPLATE = Path(__file__).parents[1] / "methods" / "TEMPLATE.md"


def template_code() -> str:
    """The python block of methods/TEMPLATE.md, after as many blank lines as precede it (so that tracebacks give
    the file's line numbers)."""
    text = TEMPLATE.read_text(encoding="utf-8")
    (match,) = re.finditer(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return "\n" * text[: match.start(1)].count("\n") + match[1]


def _register_template() -> str:
    """Import the template's code as a module (registering its method, once per process); its method's name."""
    code = template_code()
    name = re.search(r'^    name = "(\w+)"', code, flags=re.MULTILINE)[1]
    if name not in METHODS:
        spec = importlib.util.spec_from_loader("cpt_bench_template_example", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their class's module up there
        exec(compile(code, str(TEMPLATE), "exec"), module.__dict__)
    return name


TEMPLATE_METHOD = _register_template()
ALL_METHODS = sorted(registered_methods())  # the registered plugins and the template's example


def test_the_registry_found_every_plugin_file():
    plugin_files = {p.stem for folder in ("methods", "baselines")
                    for p in (Path(__file__).parents[1] / folder).glob("*.py") if p.stem != "__init__"}
    modules = {METHODS[name].__module__.rsplit(".", 1)[-1] for name in ALL_METHODS if name != TEMPLATE_METHOD}
    assert modules == plugin_files


def test_the_template_method_is_about_twenty_lines():
    code_lines = [line for line in template_code().splitlines()
                  if line.strip() and not line.strip().startswith(("#", '"""', "import", "from"))
                  and not line.rstrip().endswith('"""')]
    assert len(code_lines) <= 25, len(code_lines)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_two_stages_finite_metrics_and_a_crash_mid_stage_resumes_to_the_same_result(name, tiny_suite, tmp_path,
                                                                                   monkeypatch, reference_runs):
    reference = reference_runs(name)  # two short stages on the tiny suite, uninterrupted
    _assert_finite(reference)
    cls = method_class(name)
    assert reference["method_config"] == dataclasses.asdict(cls.Settings())
    if not cls.trains_lm:
        assert reference["stages"] == []
        return  # no DAP stage to interrupt
    assert [s["steps"] for s in reference["stages"]] == [4 * s for s in _steps_scales(cls)]
    assert all(s["loss_terms"]["mlm"] == s["loss_curve"] for s in reference["stages"])
    out = tmp_path / "crashed"
    # the tiny suite trains 4 steps per domain, checkpoints every 2 steps; the trainer draws each batch in the step
    # before (a stage draws 5): draw 9 is made in step 3 of the second stage (joint: step 8 of its 8-step stage)
    crash_at_batch(monkeypatch, 9)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, out, name)
    assert not list(out.glob("*.json")), "a crashed run left a result file"
    monkeypatch.undo()
    _assert_state_round_trips(name, tiny_suite, next(out.glob(".work/*/ckpt-*")))
    resumed = run_tiny(tiny_suite, out, name)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output
    assert_same_result(only_result(out), reference)


def _steps_scales(cls) -> list[int]:
    return [stage.steps_scale for stage in cls().plan_stages(["cats", "dogs"])]


def _assert_finite(result: dict) -> None:
    validate_result(result, "the run's result file")
    assert result["metrics"]["final_macro_f1"] is not None
    for key, value in result["metrics"].items():
        assert value is None or math.isfinite(value), key
    for metric, rows in result["matrix"].items():
        assert all(v is None or 0.0 <= v <= 1.0 for row in rows for v in row), metric
    perplexity = result["perplexity"]
    assert all(math.isfinite(v) for row in [perplexity["base"], *perplexity["stages"]] for v in row)
    assert all(math.isfinite(s["loss_last"]) for s in result["stages"])
    assert all(isinstance(v, int) and v >= 0 for v in result["overhead"].values())


def _assert_state_round_trips(name: str, tiny_suite: Path, checkpoint: Path) -> None:
    """A checkpoint's method state, loaded into a fresh method in the resume order (`before_sequence` on the
    original model, then `load_state_dict`), gives back the same `state_dict`, through the checkpoint format."""
    from accelerate import Accelerator

    from cpt_bench.running.plan import RunRequest, plan_run

    saved = load_state(checkpoint)["method"]
    plan = plan_run(RunRequest(method=name, suite=str(tiny_suite), show_progress=False))
    method = plan.method_cls(plan.method_settings)
    model = plan.original_model
    method.before_sequence(SequenceState(model, plan.tokenizer, Accelerator(cpu=True), plan.domains, 0,
                                         [t.train.texts for t in plan.data.tasks]))
    method.load_state_dict(saved)
    save_state(method.state_dict(), checkpoint.parent / "round-trip")
    _assert_same_state(load_state(checkpoint.parent / "round-trip"), saved)


def _assert_same_state(got, want, where: str = "state") -> None:
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_same_state(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want)):
            _assert_same_state(a, b, f"{where}[{index}]")
    else:
        assert got == want, where


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_setting_is_settable_with_set(name, tiny_suite):
    from cpt_bench.running.plan import RunRequest, plan_run

    cls = method_class(name)
    defaults = cls.Settings()
    hints = typing.get_type_hints(cls.Settings)
    for field in dataclasses.fields(cls.Settings):
        value = _another_value(hints[field.name], getattr(defaults, field.name))
        option = f"{name}.{field.name}={json.dumps(value)}"
        plan = plan_run(RunRequest(method=name, suite=str(tiny_suite), sets=[option], show_progress=False))
        assert getattr(plan.method_settings, field.name) == value, option


def _another_value(annotation, default):
    """A valid value of a setting that differs from its default where the type says what else is valid (a flag,
    a choice), else the default itself (which must still parse)."""
    if annotation is bool:
        return not default
    if typing.get_origin(annotation) is typing.Literal:
        return next(option for option in typing.get_args(annotation) if option != default)
    return default


def test_the_readme_shows_the_template_as_it_is():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Add a method in 20 lines", 1)[1].split("\n## ", 1)[0]
    (excerpt,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    template = template_code().splitlines()
    position = 0
    for line in excerpt.splitlines():  # every line of the excerpt, in order, in the template
        position = template.index(line, position) + 1 if line.strip() else position
