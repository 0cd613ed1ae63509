"""`cpt-bench sweep`: a grid of runs (methods with setting variants × orders × seeds) read from a YAML file, run by
an executor (cpt_bench/sweeps/executors: local worker processes, a SLURM job array; docs/sweeps.md).

Each run is `cpt-bench run` in its own process, so a sweep adds nothing to a run's behaviour: a finished run (its
result file exists) is skipped, an interrupted one resumes from its checkpoint in OUTPUT/.work, and the sweep's own
bookkeeping is one state file and one log per run in OUTPUT/.sweep.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cpt_bench.common.atomic import write_json_atomic
from cpt_bench.common.errors import BadInput

GRID_KEYS = {"suite", "model", "data_dir", "methods", "orders", "seeds", "set", "eval", "limit", "steps", "device",
             "checkpoint_every", "output", "report", "resources", "report_to",
             "tuning"}  # tuning: what benchmarks/tuning.py records in a tuning grid (the sweep ignores it)
METHOD_KEYS = {"method", "settings", "variants"}
REPORT_KEYS = {"table", "html", "plots", "compare_with"}
RESOURCE_KEYS = {"gpus", "processes", "cpus", "mem_gb", "time_min", "signal_delay_s", "partition", "setup", "slurm"}
STATES = ("done", "running", "queued", "failed", "resumable")


@dataclasses.dataclass
class Resources:
    """What one run asks of a SLURM node (the local executor uses `processes` only)."""

    gpus: int = 0  # GPUs per run
    processes: int = 0  # processes per run (accelerate launch); 0: one per GPU, or one without GPUs
    cpus: int = 2  # CPU cores per run
    mem_gb: float = 16
    time_min: int = 120  # the job's time limit; a run cut by it is requeued and resumes from its checkpoint
    signal_delay_s: int = 90  # SIGUSR2 this long before the limit: the run saves its checkpoint and is requeued
    partition: str | None = None
    setup: list[str] = dataclasses.field(default_factory=list)  # lines run before each job (module load, venv)
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)  # more sbatch options, e.g. {account: X}

    @property
    def processes_per_run(self) -> int:
        return self.processes or max(1, self.gpus)


@dataclasses.dataclass
class GridRun:
    """One run of a grid: a method with one setting variant, one order, one seed, and the result file it makes."""

    label: str
    method: str
    settings: dict[str, str]
    order: str
    seed: int
    command: list[str]
    result: Path

    @property
    def key(self) -> str:
        return self.result.stem


@dataclasses.dataclass
class Grid:
    source: Path
    suite: str
    runs: list[GridRun]
    output: Path
    resources: Resources
    report: dict[str, Any]

    @property
    def state_dir(self) -> Path:
        return self.output / ".sweep"

    def state_file(self, run: GridRun) -> Path:
        return self.state_dir / f"{run.key}.json"

    def log_file(self, run: GridRun) -> Path:
        return self.state_dir / f"{run.key}.log"


# ---------------------------------------------------------------- reading and expanding a grid file

RUN_OPTION_TYPES = {"steps": int, "limit": int, "checkpoint_every": int, "eval": str, "device": str,
                    "report_to": str, "model": str, "data_dir": str, "suite": str}


def load_grid(path: str | Path) -> Grid:
    """Read, check and expand a grid file; every run is checked (method, order, settings, data) before any runs.
    Bad input of any kind is one line (BadInput)."""
    source = Path(path)
    if not source.is_file():
        raise BadInput(f"grid file {path}: no such file")
    try:
        spec = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise BadInput(f"grid file {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise BadInput(f"grid file {path}: expected a mapping of keys (suite, methods, orders, seeds, ...)")
    _known_keys(spec, GRID_KEYS, f"grid file {path}")
    for required in ("methods", "output"):
        if required not in spec:
            raise BadInput(f"grid file {path}: the key {required!r} is missing")
    for key, kind in RUN_OPTION_TYPES.items():  # as `run` would parse them, before any run is planned
        value = spec.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise BadInput(f"grid file {path}: {key} must be {'an integer' if kind is int else 'a string'}, "
                           f"got {value!r}")
    resources = _resources(spec.get("resources") or {}, path)
    report = spec.get("report") or {}
    _known_keys(report, REPORT_KEYS, f"grid file {path}: report")
    output = Path(spec["output"])
    variants = [variant for entry in _as_list(spec["methods"], "methods", path)
                for variant in _method_variants(entry, path)]
    orders = [_order_text(order, path) for order in _as_list(spec.get("orders") or [None], "orders", path)]
    seeds = _as_list(spec.get("seeds", [0]), "seeds", path)
    if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise BadInput(f"grid file {path}: seeds must be integers, got {seeds}")
    common = {str(k): _set_value(v) for k, v in (spec.get("set") or {}).items()}
    suite = str(spec.get("suite") or _default_suite())
    runs, result_files = [], ResultFiles()
    for (method, variant, settings) in variants:
        for order in orders:
            for seed in seeds:
                run = _grid_run(spec, suite, method, variant, {**common, **settings}, order, seed, output, resources)
                run.result = result_files.result_path(run, spec, suite)
                runs.append(run)
    _refuse_duplicates(runs, path)
    return Grid(source, suite, runs, output, resources, report)


def _mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise BadInput(f"{where}: expected a mapping, got {type(value).__name__}")


def _known_keys(mapping: Any, known: set[str], where: str) -> None:
    _mapping(mapping, where)
    unknown = sorted(set(map(str, mapping)) - known)
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _as_list(value: Any, key: str, path: Path | str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise BadInput(f"grid file {path}: {key} is empty")
    return items


def _set_value(value: Any) -> str:
    """A YAML value as `--set` text (lists and mappings as YAML flow text, which `--set` parses back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def _method_variants(entry: Any, path: Path | str) -> list[tuple[str, str, dict[str, str]]]:
    """(method, variant label, settings) for one `methods` entry: `naive`, `softmask@softmask.budget=0.1;...`, or
    {method: NAME, settings: {...}} or {method: NAME, variants: {LABEL: {...}, ...}}."""
    if isinstance(entry, str):
        method, _, text = entry.partition("@")
        pairs = [item.partition("=") for item in text.split(";") if item]
        for _key, equals, _ in pairs:
            if not equals:
                raise BadInput(f"grid file {path}: method entry {entry!r}: expected METHOD@KEY=VALUE;KEY=VALUE")
        return [(method.strip(), text, {k.strip(): v.strip() for k, _, v in pairs})]
    _known_keys(entry, METHOD_KEYS, f"grid file {path}: methods entry")
    if "method" not in entry:
        raise BadInput(f"grid file {path}: methods entry {entry}: the key 'method' is missing")
    method = str(entry["method"])
    if "variants" in entry and "settings" in entry:
        raise BadInput(f"grid file {path}: methods entry {method!r}: give settings or variants, not both")
    if "variants" in entry:
        variants = entry["variants"]
        _mapping(variants, f"grid file {path}: {method} variants")
        if not variants:
            raise BadInput(f"grid file {path}: methods entry {method!r}: variants is empty")
        return [(method, str(label), {str(k): _set_value(v) for k, v in (values or {}).items()})
                for label, values in variants.items()]
    settings = entry.get("settings") or {}
    _mapping(settings, f"grid file {path}: {method} settings")
    settings = {str(k): _set_value(v) for k, v in settings.items()}
    return [(method, ";".join(f"{k}={v}" for k, v in settings.items()), settings)]


def _order_text(order: Any, path: Path | str) -> str | None:
    """An order as `--order` text: NAME:K, comma-separated names, or a list of names; None: the suite's own."""
    if order is None:
        return None
    if isinstance(order, list) and all(isinstance(name, str) for name in order):
        return ",".join(order)
    if isinstance(order, str):
        return order
    raise BadInput(f"grid file {path}: an order is NAME:K, 'a,b,c' or a list of domain names, got {order!r}")


def _resources(spec: Any, path: Path | str) -> Resources:
    _known_keys(spec, RESOURCE_KEYS, f"grid file {path}: resources")
    resources = Resources(**spec)
    if isinstance(resources.setup, str):
        resources.setup = [resources.setup]
    for name in ("gpus", "processes", "cpus", "time_min", "signal_delay_s"):
        value = getattr(resources, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadInput(f"grid file {path}: resources.{name} must be a non-negative integer, got {value!r}")
    if resources.cpus < 1 or resources.time_min < 1:
        raise BadInput(f"grid file {path}: resources.cpus and resources.time_min must be at least 1")
    return resources


def _default_suite() -> str:
    from cpt_bench.data.suite import DEFAULT_SUITE

    return DEFAULT_SUITE


def _grid_run(spec: dict[str, Any], suite: str, method: str, variant: str, settings: dict[str, str],
              order: str | None, seed: int, output: Path, resources: Resources) -> GridRun:
    label = " ".join([method + (f"[{variant}]" if variant else ""), order or "(suite order)", f"seed {seed}"])
    options = ["--method", method, "--suite", suite, "--seed", str(seed), "--output", str(output.resolve()),
               "--quiet", "--checkpoint-every", str(spec.get("checkpoint_every", 500))]
    options += ["--order", order] if order else []
    for key in ("model", "steps", "eval", "limit", "device", "report_to"):
        if spec.get(key) is not None:
            options += [f"--{key.replace('_', '-')}", str(spec[key])]
    if spec.get("data_dir") is not None:
        options += ["--data-dir", str(Path(spec["data_dir"]).expanduser().resolve())]
    for key, value in settings.items():
        options += ["--set", f"{key}={value}"]
    launcher = [sys.executable, "-m", "cpt_bench"]
    if resources.processes_per_run > 1:  # one run across several processes (GPUs): accelerate's launcher
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
                    str(resources.processes_per_run), *([] if resources.gpus else ["--cpu"]), "-m", "cpt_bench"]
    return GridRun(label, method, settings, order or "", seed, [*launcher, "run", *options], Path())


class ResultFiles:
    """The result file each run will write, known before any run starts: `identity.run_key` of the plan that
    `cpt-bench run` itself makes without its model (`plan.plan_data`), so the two cannot disagree. The data is
    read once per (suite, order, language seed, data options), not once per run."""

    def __init__(self):
        self.loaded: dict[tuple, Any] = {}

    def result_path(self, run: GridRun, spec: dict[str, Any], suite_name: str) -> Path:
        from cpt_bench.running.identity import run_key
        from cpt_bench.running.plan import RunRequest, plan_data

        request = RunRequest(method=run.method, suite=suite_name,
                             order=run.order.split(",") if run.order else None, seeds=[run.seed],
                             model=spec.get("model"), data_dir=spec.get("data_dir"), steps=spec.get("steps"),
                             output=str(Path(spec["output"]).resolve()), device=spec.get("device") or "auto",
                             eval=spec.get("eval") or "full", limit=spec.get("limit"),
                             sets=[f"{k}={v}" for k, v in run.settings.items()],
                             checkpoint_every=spec.get("checkpoint_every", 500),
                             report_to=spec.get("report_to") or "none")
        return run_key(plan_data(request, self.loaded), run.seed).result_path


def _refuse_duplicates(runs: list[GridRun], path: Path | str) -> None:
    seen: dict[Path, GridRun] = {}
    for run in runs:
        if run.result in seen:
            raise BadInput(f"grid file {path}: {seen[run.result].label!r} and {run.label!r} are the same run "
                           f"(same method, settings, order and seed)")
        seen[run.result] = run


# ---------------------------------------------------------------- the state of each run

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_state(grid: Grid, run: GridRun, **state: Any) -> None:
    grid.state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(grid.state_file(run), {"label": run.label, "updated": now(), **state})


def read_state(grid: Grid, run: GridRun) -> dict[str, Any]:
    try:
        return json.loads(grid.state_file(run).read_text())
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_reached(grid: Grid, run: GridRun) -> str | None:
    """'stage S, step N' of the run's newest checkpoint (OUTPUT/.work/<run>/ckpt-S-N), or None."""
    work = grid.output / ".work" / run.key
    found = sorted((int(s), int(n)) for s, n in
                   (entry.name.split("-")[1:] for entry in work.glob("ckpt-*-*") if (entry / "state.json").is_file()))
    if not found:
        return None
    stage, step = found[-1]
    return f"stage {stage + 1}, step {step}"


def last_error_line(log: Path) -> str:
    """The line that says what went wrong: the last `error:` line, else the last non-empty line of the log."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith(("error:", "Error", "Traceback"))
              or "Error:" in line]
    return (errors or lines or [""])[-1][:300]


# ---------------------------------------------------------------- running

def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_worker(cores: int, parallel: int, processes_per_run: int = 1) -> int:
    """floor(cores / processes at once), at least 1: two unrestricted torch processes on 2 cores each run several
    times slower than with one thread each."""
    return max(1, cores // max(1, parallel * processes_per_run))


def run_one(command: list[str], log: Path, threads: int | None, on_start: Callable[[int], None] | None = None) -> int:
    """Run one `cpt-bench run` process, its output appended to `log`; returns its exit code."""
    env = dict(os.environ)
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n[{now()}] {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        if on_start is not None:
            on_start(process.pid)
        return process.wait()


INTERRUPTED = 130  # `cpt-bench run` stopped by a signal after saving its checkpoint


def finish_run(grid: Grid, run: GridRun, returncode: int, **extra: Any) -> bool:
    if returncode == 0 and run.result.is_file():
        write_state(grid, run, state="done", returncode=0, **extra)
        return True
    if returncode == INTERRUPTED:  # preempted, timed out or cancelled: resumable, not failed
        write_state(grid, run, state="interrupted", returncode=returncode, **extra)
        return False
    error = last_error_line(grid.log_file(run)) or f"exit code {returncode}"
    write_state(grid, run, state="failed", returncode=returncode, error=error, **extra)
    return False


def write_report(grid: Grid, echo: Callable[[str], None]) -> None:
    """The grid's table (and page and plots), as `cpt-bench report` writes them, once every run is done."""
    if not grid.report or not all(run.result.is_file() for run in grid.runs):
        return
    import glob

    from cpt_bench.common.atomic import write_text_atomic
    from cpt_bench.report.formats import report as make_report

    more = [match for pattern in grid.report.get("compare_with") or [] for match in sorted(glob.glob(str(pattern)))]
    paths = [str(grid.output), *more]
    plots = grid.report.get("plots")
    if grid.report.get("table"):
        write_text_atomic(Path(grid.report["table"]), make_report(paths, "markdown", plots_dir=plots) + "\n")
        echo(f"wrote {grid.report['table']}")
    if grid.report.get("html"):
        write_text_atomic(Path(grid.report["html"]), make_report(paths, "html") + "\n")
        echo(f"wrote {grid.report['html']}")
