"""`cpt-bench sweep --executor slurm` against a real SLURM (a single-node cluster on this machine: `bash
.ci/slurm-localhost.sh start`, which CI runs where apt and root are available). Without a cluster these tests
skip and say why; they never pass without one."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from interruptions import assert_same_result


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM commands on the PATH"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install 'cpt-bench[slurm]')"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer"
    if states.returncode != 0:
        return f"sinfo failed: {states.stderr.strip()[:200]}"
    if not {"idle", "mixed", "allocated"} & set(states.stdout.split()):
        return f"no usable node (sinfo: {states.stdout.split()})"
    return None


@pytest.fixture
def slurm_cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no SLURM cluster to test against: {problem}; start one with `bash .ci/slurm-localhost.sh start`")


def _grid(tmp_path: Path, tiny_suite: Path, **spec) -> Path:
    grid = {"suite": str(tiny_suite), "methods": ["naive"], "orders": ["cats,dogs"], "seeds": [0],
            "output": str(tmp_path / "runs"), "resources": {"cpus": 1, "mem_gb": 1, "time_min": 10}, **spec}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_a_two_run_grid_runs_as_a_slurm_job_array(slurm_cluster, tiny_suite, tmp_path):
    path = _grid(tmp_path, tiny_suite, seeds=[0, 1], report={"table": str(tmp_path / "table.md")})
    result = run_cli("sweep", str(path), "--executor", "slurm")
    assert result.exit_code == 0, result.output
    assert result.output.count("SLURM job ") == 2
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    status = run_cli("sweep", "status", str(path))
    assert status.exit_code == 0
    assert f"{path}: 2 done" in status.output, status.output
    assert "| naive" in (tmp_path / "table.md").read_text()  # written when the last run finished
    for state in (tmp_path / "runs" / ".sweep").glob("*.json"):
        assert json.loads(state.read_text())["job_id"]


def test_a_cancelled_job_resumes_from_its_checkpoint_when_the_grid_is_resubmitted(slurm_cluster, tiny_suite, tmp_path):
    # long enough (a few thousand tiny steps) to be cancelled in its first stage, after a checkpoint
    spec = {"steps": 1000, "checkpoint_every": 50}
    from cpt_bench.sweeps.grid import load_grid, run_one

    (tmp_path / "reference").mkdir()
    reference = load_grid(_grid(tmp_path / "reference", tiny_suite, **spec))
    (run,) = reference.runs  # the uninterrupted run, here, on one thread as the job's (cpus: 1)
    assert run_one(run.command, reference.log_file(run), threads=1) == 0
    expected = run.result

    path = _grid(tmp_path, tiny_suite, **spec)
    submitted = run_cli("sweep", str(path), "--executor", "slurm", "--no-wait")
    assert submitted.exit_code == 0, submitted.output
    job = json.loads(next((tmp_path / "runs" / ".sweep").glob("*.json")).read_text())["job_id"]
    deadline = time.monotonic() + 300
    while not list((tmp_path / "runs" / ".work").glob("*/ckpt-0-*/state.json")):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert not list((tmp_path / "runs").glob("*.json")), "the run finished before it could be cancelled"
        time.sleep(0.2)
    subprocess.run(["scancel", str(job)], check=True)
    while subprocess.run(["squeue", "-h", "-j", str(job)], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the cancelled job did not leave the queue"
        time.sleep(0.5)
    status = run_cli("sweep", "status", str(path))
    assert "resumable" in status.output, status.output
    assert not list((tmp_path / "runs").glob("*.json"))

    again = run_cli("sweep", str(path), "--executor", "slurm")
    assert again.exit_code == 0, again.output
    (log,) = (tmp_path / "runs" / ".sweep").glob("*.log")
    assert "resuming" in log.read_text()  # continued from the checkpoint, not started over
    (result,) = (tmp_path / "runs").glob("*.json")
    assert_same_result(json.loads(result.read_text()), json.loads(expected.read_text()))
