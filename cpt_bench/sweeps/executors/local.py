"""The local executor: worker processes on this machine, each `cpt-bench run` with floor(cores / workers)
threads (two unrestricted torch processes on 2 cores run several times slower than with one thread each)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cpt_bench.sweeps.executors import Executor
from cpt_bench.sweeps.grid import (
    Grid,
    GridRun,
    cpu_cores,
    finish_run,
    now,
    pid_alive,
    read_state,
    run_one,
    threads_per_worker,
    write_state,
)


class LocalExecutor(Executor):
    name = "local"
    description = "worker processes here"

    def execute(self, grid: Grid, todo: list[GridRun], max_parallel: int, echo: Callable[[str], None],
                wait: bool = True) -> list[GridRun]:
        """Run `todo` in at most `max_parallel` worker processes at once (always waits: the workers are this
        process's children); returns the runs that failed."""
        # fewer runs than workers: the idle workers' cores go to the runs there are
        at_once = min(max_parallel, max(1, len(todo)))
        threads = threads_per_worker(cpu_cores(), at_once, grid.resources.processes_per_run)
        echo(f"{len(grid.runs) - len(todo)} of {len(grid.runs)} runs done or running elsewhere; {len(todo)} to run, "
             f"{at_once} at once, {threads} thread(s) each")
        host = socket.gethostname()

        def work(run: GridRun) -> bool:
            started = time.perf_counter()
            returncode = run_one(run.command, grid.log_file(run), threads, lambda pid: write_state(
                grid, run, state="running", executor=self.name, host=host, pid=pid, started=now()))
            ok = finish_run(grid, run, returncode, executor=self.name, host=host)
            echo(f"{run.label}: {'done' if ok else 'FAILED: ' + read_state(grid, run).get('error', '')} "
                 f"({time.perf_counter() - started:.0f} s)")
            return ok

        with ThreadPoolExecutor(at_once) as pool:
            outcomes = list(pool.map(work, todo))
        return [run for run, ok in zip(todo, outcomes) if not ok]

    def job_state(self, state: dict[str, Any]) -> tuple[str, str] | None:
        alive = state.get("state") == "running" and state.get("host") == socket.gethostname() and \
            pid_alive(int(state.get("pid", 0)))
        return ("running", f"pid {state['pid']}") if alive else None
