"""The executors of `cpt-bench sweep`: where and how a grid's runs are started (docs/sweeps.md). Each executor
is one file in this folder holding one `Executor` subclass; the table of them (`registered_executors`) is read
from the folder, so adding an executor is adding its file, and `--executor NAME` picks it by its `name`. The
state of every run (done, running, queued, failed, resumable) is read here, asking each executor about the job
it recorded for the run."""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpt_bench.common.errors import BadInput
from cpt_bench.sweeps.grid import STATES, Grid, GridRun, checkpoint_reached, pid_alive, read_state


class Executor:
    """How a sweep's runs are started and followed. A run's sweep state file (`sweep.write_state`) records
    `executor: NAME` and whatever the executor needs to find its job again (a pid, a job id)."""

    name: str = ""
    description: str = ""

    def check(self) -> None:
        """BadInput, in one line, when this executor cannot work here (a missing package or command)."""

    def execute(self, grid: Grid, todo: list[GridRun], max_parallel: int, echo: Callable[[str], None],
                wait: bool = True) -> list[GridRun] | None:
        """Start the runs `todo` (at most `max_parallel` at once); with `wait`, return once they ended, with the
        runs that are not done; without, return None once they are submitted."""
        raise NotImplementedError

    def job_state(self, state: dict[str, Any]) -> tuple[str, str] | None:
        """("running" or "queued", detail) while the job recorded in a run's sweep state is alive; None once it
        has ended or is unknown to this executor."""
        return None


@functools.cache
def registered_executors() -> dict[str, Executor]:
    """Every executor of this folder, by name."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__name__}.{module.name}")
    return {cls.name: cls() for cls in Executor.__subclasses__() if cls.name}


def executor_named(name: str) -> Executor:
    executors = registered_executors()
    if name not in executors:
        raise BadInput(f"--executor must be one of {', '.join(sorted(executors))}, got {name!r}")
    return executors[name]


def recorded_executor(state: dict[str, Any]) -> Executor | None:
    """The executor that started a run, from its sweep state (state files older than the `executor` key: a job
    id is SLURM's, a pid the local one's)."""
    name = state.get("executor") or ("slurm" if state.get("job_id") else "local" if state.get("pid") else None)
    return registered_executors().get(name) if name else None


def live_job(state: dict[str, Any]) -> tuple[str, str] | None:
    executor = recorded_executor(state)
    return executor.job_state(state) if executor else None


def started_by_hand(grid: Grid, run: GridRun) -> bool:
    """Whether a `cpt-bench run` outside any sweep holds the run's work directory on this host (owner.json)."""
    try:
        owner = json.loads((grid.output / ".work" / run.key / "owner.json").read_text())
    except (OSError, ValueError):
        return False
    return owner.get("host") == socket.gethostname() and pid_alive(int(owner.get("pid", 0)))


def is_active(grid: Grid, run: GridRun) -> bool:
    """Whether the run's job (a SLURM job queued or running, a process on this host) is alive, or a `cpt-bench
    run` started by hand has it."""
    return live_job(read_state(grid, run)) is not None or started_by_hand(grid, run)


def pending_runs(grid: Grid) -> list[GridRun]:
    """The runs to start: not done, and not running or queued elsewhere (another sweep, a SLURM job)."""
    return [run for run in grid.runs if not run.result.is_file() and not is_active(grid, run)]


def run_status(grid: Grid, run: GridRun) -> tuple[str, str]:
    """(state, detail): done (its result file exists), running (its job is alive), queued (not started, or
    waiting in a scheduler's queue), failed (with the last line of its error), resumable (stopped with a
    checkpoint: the next sweep continues it)."""
    if run.result.is_file():
        return "done", run.result.name
    state, reached = read_state(grid, run), checkpoint_reached(grid, run)
    progress = f" ({reached})" if reached else ""
    job = live_job(state)
    if job is not None:
        return job[0], job[1] + (progress if job[0] == "running" else "")
    if started_by_hand(grid, run):
        return "running", f"pid outside this sweep{progress}"
    if state.get("state") == "failed":
        return "failed", state.get("error") or f"exit code {state.get('returncode')}"
    if reached:
        return "resumable", reached
    if state.get("state") in ("running", "submitted", "interrupted"):
        return "failed", f"stopped before its first checkpoint (log: {grid.log_file(run)})"
    return "queued", "not started"


def status_table(grid: Grid) -> str:
    from tabulate import tabulate

    rows, counts = [], dict.fromkeys(STATES, 0)
    for run in grid.runs:
        state, detail = run_status(grid, run)
        counts[state] += 1
        rows.append([run.label, state, detail])
    summary = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    return f"{tabulate(rows, headers=['run', 'state', 'detail'], tablefmt='simple')}\n\n{grid.source}: {summary}"
