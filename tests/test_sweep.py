"""`cpt-bench sweep` with the local executor: grid files, expansion, skipping, the thread split, status, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, run_cli


def write_grid(tmp_path: Path, tiny_suite: Path, **spec) -> Path:
    grid = {"suite": str(tiny_suite), "methods": ["naive"], "orders": ["cats,dogs"], "seeds": [0],
            "output": str(tmp_path / "runs"), **spec}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_a_grid_is_the_cross_product_of_method_variants_orders_and_seeds(tiny_suite, tmp_path):
    from cpt_bench.sweeps.grid import load_grid

    path = write_grid(tmp_path, tiny_suite, seeds=[0, 1], orders=["cats,dogs", ["dogs", "cats"]],
                      methods=["naive", {"method": "ewc", "variants": {"weak": {"ewc.weight": 10},
                                                                       "strong": {"ewc.weight": 1000}}},
                               "kd@kd.alpha=0.5"],
                      set={"dap.lr": 0.002})
    grid = load_grid(path)
    assert len(grid.runs) == 4 * 2 * 2
    seen = {(run.method, tuple(sorted(run.settings.items())), run.order, run.seed) for run in grid.runs}
    assert len(seen) == 16
    for run in grid.runs:
        assert run.settings["dap.lr"] == "0.002"  # the common --set values reach every run
        assert run.command[run.command.index("dap.lr=0.002") - 1:][:2] == ["--set", "dap.lr=0.002"]
    weights = sorted(run.settings.get("ewc.weight", "-") for run in grid.runs if run.method == "ewc")
    assert weights == ["10"] * 4 + ["1000"] * 4
    assert {run.order for run in grid.runs} == {"cats,dogs", "dogs,cats"}
    assert len({run.result for run in grid.runs}) == 16  # each run its own result file


def test_a_sweep_runs_every_run_then_skips_finished_ones_and_writes_the_report(tiny_suite, tmp_path):
    path = write_grid(tmp_path, tiny_suite, seeds=[0, 1], report={"table": str(tmp_path / "table.md")})
    first = run_cli("sweep", str(path))
    assert first.exit_code == 0, first.output
    results = sorted((tmp_path / "runs").glob("*.json"))
    assert len(results) == 2
    assert "| naive" in (tmp_path / "table.md").read_text()
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_cli("sweep", str(path))
    assert again.exit_code == 0, again.output
    assert "2 of 2 runs done or running elsewhere; 0 to run" in again.output
    assert [p.stat().st_mtime_ns for p in results] == stamps  # not run again
    status = run_cli("sweep", "status", str(path))
    assert status.exit_code == 0
    assert status.output.count(" done ") == 2, status.output


def test_two_local_workers_on_two_cores_run_with_one_thread_each(tiny_suite, tmp_path, monkeypatch):
    from cpt_bench.sweeps import grid as sweep

    assert sweep.threads_per_worker(2, 2) == 1
    assert sweep.threads_per_worker(16, 2) == 8
    assert sweep.threads_per_worker(2, 4) == 1  # never zero
    assert sweep.threads_per_worker(16, 2, processes_per_run=2) == 4
    monkeypatch.setattr(sweep, "cpu_cores", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # what the workers must not inherit
    path = write_grid(tmp_path, tiny_suite, seeds=[0, 1])
    result = run_cli("sweep", str(path), "--max-parallel", "2")
    assert result.exit_code == 0, result.output
    assert "2 at once, 1 thread(s) each" in result.output
    for file in (tmp_path / "runs").glob("*.json"):  # what torch used in each worker, recorded by the run
        assert "1 threads" in json.loads(file.read_text())["provenance"]["device"]
    # One run left for two workers: it gets both cores, and no idle worker is counted.
    path = write_grid(tmp_path, tiny_suite, seeds=[0, 1, 2])
    result = run_cli("sweep", str(path), "--max-parallel", "2")
    assert result.exit_code == 0, result.output
    assert "1 to run, 1 at once, 2 thread(s) each" in result.output
    (last,) = (tmp_path / "runs").glob("*seed2*.json")
    assert "2 threads" in json.loads(last.read_text())["provenance"]["device"]


def test_status_reports_every_state(tiny_suite, tmp_path):
    from cpt_bench.sweeps import executors
    from cpt_bench.sweeps import grid as sweep

    path = write_grid(tmp_path, tiny_suite, seeds=[0, 1, 2, 3, 4])
    grid = sweep.load_grid(path)
    done, running, queued, failed, resumable = grid.runs
    assert run_cli("run", *done.command[done.command.index("run") + 1:]).exit_code == 0  # done: its result file
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        sweep.write_state(grid, running, state="running", host=socket.gethostname(), pid=sleeper.pid)
        # failed: a process that ends with an error line, as `cpt-bench run` does
        code = sweep.run_one([sys.executable, "-c", "import sys; print('error: the data went missing'); sys.exit(2)"],
                             grid.log_file(failed), threads=1)
        sweep.finish_run(grid, failed, code)
        checkpoint = grid.output / ".work" / resumable.key / "ckpt-1-6"  # as the runner names them
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_text("{}")
        states = {run.label: executors.run_status(grid, run) for run in grid.runs}
        assert states[done.label][0] == "done"
        assert states[running.label] == ("running", f"pid {sleeper.pid}")
        assert states[queued.label] == ("queued", "not started")
        assert states[failed.label] == ("failed", "error: the data went missing")
        assert states[resumable.label] == ("resumable", "stage 2, step 6")
        table = run_cli("sweep", "status", str(path))
        assert table.exit_code == 0
        assert "1 done, 1 running, 1 queued, 1 failed, 1 resumable" in table.output
        # a sweep starts neither the done nor the running one
        assert {run.label for run in executors.pending_runs(grid)} == {queued.label, failed.label, resumable.label}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert executors.run_status(grid, running)[0] == "failed"  # its process is gone, without a checkpoint


def test_a_failed_run_makes_the_sweep_exit_1_and_names_it(tiny_suite, tmp_path):
    # a data file that the plan reads but whose run fails later is hard to build; a model folder deleted after
    # the plan is one: the grid is checked (data only), then the run cannot load its model
    import shutil

    suite = yaml.safe_load(tiny_suite.read_text())
    model = tmp_path / "model-copy"
    shutil.copytree(suite["model"], model)
    suite["model"] = str(model)
    tiny_suite.write_text(yaml.safe_dump(suite))
    path = write_grid(tmp_path, tiny_suite)
    from cpt_bench.sweeps import executors
    from cpt_bench.sweeps import grid as sweep

    grid = sweep.load_grid(path)
    shutil.rmtree(model)
    failed = executors.executor_named("local").execute(grid, executors.pending_runs(grid), 1, lambda line: None)
    assert [run.label for run in failed] == [grid.runs[0].label]
    state, detail = executors.run_status(grid, grid.runs[0])
    assert state == "failed" and detail.startswith("error: "), detail


@pytest.mark.parametrize("edit, fragments", [
    ({"methodz": ["naive"]}, ["unknown key 'methodz'"]),
    ({"methods": ["nope"]}, ["nope"]),
    ({"orders": ["cats,birds"]}, ["birds"]),
    ({"methods": ["naive@dap.nope=1"]}, ["nope"]),
    ({"resources": {"gpu": 1}}, ["resources: unknown key 'gpu'"]),
    ({"seeds": ["zero"]}, ["seeds must be integers"]),
    ({"methods": ["naive", "naive@dap.lr=0.001"]},  # the suite's own learning rate: the same run twice
     ["'naive cats,dogs seed 0'", "'naive[dap.lr=0.001] cats,dogs seed 0'", "same run"]),
])
def test_bad_grid_files_are_one_line_errors_before_anything_runs(edit, fragments, tiny_suite, tmp_path):
    path = write_grid(tmp_path, tiny_suite)
    spec = yaml.safe_load(path.read_text())
    if "methodz" in edit:
        spec.pop("methods")
    spec |= edit
    path.write_text(yaml.safe_dump(spec))
    result = run_cli("sweep", str(path))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.json"))


def test_slurm_without_submitit_or_sbatch_is_a_one_line_error(tiny_suite, tmp_path, monkeypatch):
    from cpt_bench.sweeps.executors import slurm as sweep_slurm

    path = write_grid(tmp_path, tiny_suite)
    monkeypatch.setattr(sweep_slurm, "submitit", None)
    assert_one_line_error(run_cli("sweep", str(path), "--executor", "slurm"), "submitit", "cpt-bench[slurm]")
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if sweep_slurm.submitit is not None:
        assert_one_line_error(run_cli("sweep", str(path), "--executor", "slurm"), "no sbatch on the PATH")


def test_dry_run_prints_the_plan_and_starts_nothing(tiny_suite, tmp_path):
    path = write_grid(tmp_path, tiny_suite, seeds=[0, 1])
    result = run_cli("sweep", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "2 runs, 2 to run" in result.output and "nothing started" in result.output
    assert "cpt_bench run --method naive" in result.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))


def test_the_committed_grid_files_expand(monkeypatch):
    """The leaderboard's and the sweeps' grid files are valid (they replace the old scripts)."""
    from cpt_bench.sweeps.grid import load_grid

    grids = sorted(Path("results").rglob("grid.yaml")) + sorted(Path("results/sweeps").glob("*.yaml"))
    checked = 0
    for path in grids:
        spec = yaml.safe_load(path.read_text())
        if "domains" in spec or spec.get("data_dir"):  # a suite (the dev copy), or real data a clone lacks
            continue
        assert load_grid(path).runs, path
        checked += 1
    assert checked >= 8, grids  # the leaderboard, softmask controls, decoder, llm-baselines, 4 tuning sweeps


def test_a_run_started_by_hand_is_seen_running_and_not_started_twice(tiny_suite, tmp_path):
    """`cpt-bench run` claims its work directory (owner.json: host, pid); a sweep leaves such a run alone."""
    import socket

    from cpt_bench.sweeps import executors
    from cpt_bench.sweeps import grid as sweep

    grid = sweep.load_grid(write_grid(tmp_path, tiny_suite))
    (run,) = grid.runs
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        work = grid.output / ".work" / run.key
        work.mkdir(parents=True)
        (work / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        assert executors.run_status(grid, run)[0] == "running"
        assert executors.pending_runs(grid) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert executors.pending_runs(grid) == [run]  # its process gone: the next sweep takes it


def test_a_run_claims_its_work_directory_while_it_runs(tiny_suite, tmp_path, monkeypatch):
    import os

    from cpt_bench.training import checkpoint

    seen = []
    original = checkpoint.WorkDir.save_checkpoint

    def spy(self, stage, step, state):
        seen.append(json.loads((self.path / "owner.json").read_text()))
        return original(self, stage, step, state)

    monkeypatch.setattr(checkpoint.WorkDir, "save_checkpoint", spy)
    result = run_cli("run", "--method", "naive", "--suite", str(tiny_suite), "--output", str(tmp_path / "out"),
                     "--quiet")
    assert result.exit_code == 0, result.output
    assert seen and all(owner["pid"] == os.getpid() for owner in seen)


def test_a_changed_planning_step_moves_the_sweeps_predicted_file_with_the_runs(tiny_suite, tmp_path, monkeypatch):
    """The sweep predicts each result file with the run's own identity function over the run's own plan: a
    planning step that changes the configuration (here: one more setting applied to every run) moves both."""
    import dataclasses

    import cpt_bench.running.run_data as planning
    from cpt_bench.common.settings import override
    from cpt_bench.sweeps.grid import load_grid

    path = write_grid(tmp_path, tiny_suite, steps=2, eval="final")
    (before,) = load_grid(path).runs
    original = planning.request_settings

    def with_a_new_step(suite, method_cls, request):
        settings = original(suite, method_cls, request)  # a step planning gained:
        return dataclasses.replace(settings, dap=override(settings.dap, "warmup", "0.25", "dap"))

    monkeypatch.setattr(planning, "request_settings", with_a_new_step)
    (after,) = load_grid(path).runs
    assert after.result != before.result  # the configuration changed, so did the file's hash
    out = run_cli("run", *after.command[after.command.index("run") + 1:])
    assert out.exit_code == 0, out.output
    assert [p.name for p in (tmp_path / "runs").glob("*.json")] == [after.result.name]
    written = json.loads(after.result.read_text())
    assert written["settings"]["dap"]["warmup"] == 0.25
    assert written["provenance"]["config_hash"] == after.result.stem.rsplit("__", 1)[-1]


def test_an_executor_is_one_class_that_the_sweep_finds_by_name(tiny_suite, tmp_path):
    """An `Executor` subclass is in the table as soon as it exists (a file in cpt_bench/sweeps/executors/ is imported
    by the table): `--executor NAME` gives it the pending runs, and the run states it reports are the status."""
    from cpt_bench.sweeps import executors

    given = []

    class Recording(executors.Executor):
        name = "recording"

        def execute(self, grid, todo, max_parallel, echo, wait=True):
            given.extend(todo)
            for run in todo:
                sweep_state.write_state(grid, run, state="submitted", executor=self.name, job="j1")
            return None if not wait else list(todo)

        def job_state(self, state):
            return ("queued", f"recorded job {state['job']}") if state.get("job") else None

    from cpt_bench.sweeps import grid as sweep_state

    executors.registered_executors.cache_clear()
    try:
        path = write_grid(tmp_path, tiny_suite, seeds=[0, 1])
        assert run_cli("sweep", str(path), "--executor", "recording", "--no-wait").exit_code == 0
        assert [run.seed for run in given] == [0, 1]
        status = run_cli("sweep", "status", str(path))
        assert status.output.count("recorded job j1") == 2, status.output
        assert executors.pending_runs(sweep_state.load_grid(path)) == []  # held by a live job: not started twice
    finally:
        Recording.name = ""  # out of the table again
        executors.registered_executors.cache_clear()
