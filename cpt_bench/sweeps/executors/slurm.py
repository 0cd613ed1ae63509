"""The SLURM executor of `cpt-bench sweep`: one job array through submitit, one array task per run.

Preemption and time limits: submitit asks SLURM for SIGUSR2 shortly before the limit; `cpt-bench run` takes it
(as it takes SIGTERM from `scancel` or a preemption) as a request to save its checkpoint and stop, and submitit
requeues the job (`SweepJob.checkpoint`), whose second start resumes from that checkpoint. A job that is gone
without a result (cancelled, or its node lost) is resubmitted by the next `cpt-bench sweep`, and resumes too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from cpt_bench.common.errors import BadInput
from cpt_bench.sweeps.executors import Executor
from cpt_bench.sweeps.grid import Grid, GridRun, finish_run, run_one, write_report, write_state

try:
    import submitit
except ImportError:  # an optional extra: `pip install "cpt-bench[slurm]"`
    submitit = None

EXECUTOR = "slurm"
WAITING = ("PENDING", "REQUEUED", "CONFIGURING")


def slurm_job_state(job_id: str) -> str | None:
    """PENDING, RUNNING, ... for a job still known to the scheduler; None for a finished or unknown one."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


if submitit is not None:

    class SweepJob(submitit.helpers.Checkpointable):
        """One array task: `cpt-bench run` for one grid run, its state written before and after."""

        def __call__(self, grid: Grid, run: GridRun, threads: int) -> bool:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job_id = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID", "")
            host = socket.gethostname()
            returncode = run_one(run.command, grid.log_file(run), threads, lambda pid: write_state(
                grid, run, state="running", executor=EXECUTOR, host=host, pid=pid, job_id=job_id))
            ok = finish_run(grid, run, returncode, executor=EXECUTOR, host=host, job_id=job_id)
            write_report(grid, lambda line: None)  # the last run to finish writes the grid's table
            return ok


class SlurmExecutor(Executor):
    name = EXECUTOR
    description = "a SLURM job array through submitit"

    def check(self) -> None:
        if submitit is None:
            raise BadInput("--executor slurm needs submitit, which is not installed: pip install \"cpt-bench[slurm]\"")
        if shutil.which("sbatch") is None:
            raise BadInput("--executor slurm: no sbatch on the PATH (run on a SLURM login node, or use --executor "
                           "local)")

    def execute(self, grid: Grid, todo: list[GridRun], max_parallel: int, echo: Callable[[str], None],
                wait: bool = True) -> list[GridRun] | None:
        job_ids = self.submit(grid, todo, max_parallel, echo)
        if not wait:
            return None
        self.wait(job_ids)
        return [run for run in grid.runs if not run.result.is_file()]

    def submit(self, grid: Grid, todo: list[GridRun], max_parallel: int, echo: Callable[[str], None]) -> list[str]:
        """Submit the runs as one job array; returns the job ids."""
        self.check()
        echo(f"{len(grid.runs) - len(todo)} of {len(grid.runs)} runs done or held by a live job; {len(todo)} to "
             f"submit")
        if not todo:
            return []
        resources = grid.resources
        executor = submitit.AutoExecutor(folder=grid.state_dir / "slurm" / "%j", cluster="slurm")
        options = {"timeout_min": resources.time_min, "cpus_per_task": resources.cpus, "mem_gb": resources.mem_gb,
                   "slurm_array_parallelism": max_parallel, "name": f"cpt-bench-{grid.source.stem}",
                   "slurm_signal_delay_s": resources.signal_delay_s,
                   "slurm_setup": list(resources.setup), "slurm_additional_parameters": dict(resources.slurm)}
        if resources.gpus:
            options["gpus_per_node"] = resources.gpus
        if resources.partition:
            options["slurm_partition"] = resources.partition
        executor.update_parameters(**options)
        threads = max(1, resources.cpus // resources.processes_per_run)
        with executor.batch():
            jobs = [executor.submit(SweepJob(), grid, run, threads) for run in todo]
        for run, job in zip(todo, jobs):
            write_state(grid, run, state="submitted", executor=EXECUTOR, job_id=job.job_id)
            echo(f"{run.label}: SLURM job {job.job_id}")
        return [job.job_id for job in jobs]

    @staticmethod
    def wait(job_ids: list[str], poll_seconds: float = 5.0) -> None:
        """Until no job of the list is known to the scheduler (finished, failed or cancelled; a requeued job
        stays)."""
        while any(slurm_job_state(job) is not None for job in job_ids):
            time.sleep(poll_seconds)

    def job_state(self, state: dict[str, Any]) -> tuple[str, str] | None:
        job = state.get("job_id")
        scheduler = slurm_job_state(str(job)) if job else None
        if scheduler is None:
            return None
        if scheduler in WAITING:
            return "queued", f"SLURM job {job} {scheduler.lower()}"
        return "running", f"SLURM job {job}"


def cancel(job_ids: list[str]) -> None:
    subprocess.run(["scancel", *job_ids], check=False, capture_output=True)
