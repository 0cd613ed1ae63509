"""The fault-injection campaign (bounded): a small run killed at random moments and resumed until it finishes must
publish the uninterrupted run's result; damaged files are found, never resumed from silently; two identical runs
never compute one run twice; outputs that cannot be written and result files that are not sound are one line."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, run_cli, tiny_suite_config, tiny_suite_data
from interruptions import Crash, assert_same_result, crash_at_batch, only_result, run_tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _command(suite: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cpt_bench", "run", "--method", "softmask", "--suite", str(suite), "--output",
            str(out), "--quiet", "--checkpoint-every", "1", "--steps", "12"]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, tiny_model_dir):
    """The tiny suite in a folder of its own and the uninterrupted run's result and wall time, made once for
    the tests that kill or pause real processes (the same command for each; the suite's place does not count)."""
    root = tmp_path_factory.mktemp("campaign")
    tiny_suite_data(root / "data")
    suite = root / "tiny.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite_config(tiny_model_dir), sort_keys=False))
    env = {**ENV, "CPT_BENCH_CACHE": str(root / "cache")}
    out = root / "uninterrupted"
    started = time.monotonic()
    subprocess.run(_command(suite, out), check=True, env=env, capture_output=True)
    return suite, env, only_result(out), time.monotonic() - started


@pytest.mark.slow
def test_random_sigkills_resume_to_the_uninterrupted_result(campaign, tmp_path):
    """SIGKILL at moments drawn at random over a run (start-up, mid-step, mid-evaluation, checkpoint and result
    writes), resuming after each, until it finishes: 4 kills, each at a uniform fraction of the uninterrupted
    run's length. A chain whose run finished before its kill is published, checked, and started over (at most
    3 times), so every kill lands and the test stays bounded."""
    tiny_suite, env, reference, seconds = campaign
    rng = random.Random(20261203)
    kills, outcomes, chains = 0, [], 0
    out = tmp_path / "chain0"
    while True:
        process = subprocess.Popen(_command(tiny_suite, out), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        if kills < 4:
            try:
                process.wait(timeout=rng.uniform(0.05, 0.95) * seconds)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                kills += 1
        _, stderr = process.communicate(timeout=10 * seconds)
        outcomes.append(process.returncode)
        assert process.returncode in (0, -signal.SIGKILL), stderr  # a kill, never an error of a resumed run
        for published in out.glob("*.json"):  # a finished run, or one killed after writing its result
            assert_same_result(json.loads(published.read_text()), reference)
        if process.returncode == 0 and kills == 4:
            break
        if process.returncode == 0:  # it outran its kill: the kills left go to a new chain
            chains += 1
            assert chains <= 3, outcomes
            out = tmp_path / f"chain{chains}"
    assert outcomes.count(-signal.SIGKILL) == 4, outcomes
    assert_same_result(only_result(out), reference)
    assert not any((out / ".work").iterdir())


def _crash_on_call(monkeypatch, owner, name: str, number: int, before=None, only=None) -> None:
    """Crash the `number`-th call of owner.name (of those for which `only(*args)` holds), after `before(*args)`
    (what the call had done when killed)."""
    original, calls = getattr(owner, name), [0]

    def crashing(*args, **kwargs):
        calls[0] += only is None or only(*args, **kwargs)
        if calls[0] == number and (only is None or only(*args, **kwargs)):
            if before is not None:
                before(original, *args, **kwargs)
            raise Crash(f"{name} call {number}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, crashing)


def _half_written_tensors(save_file, tensors, path, *args, **kwargs) -> None:
    save_file(tensors, path, *args, **kwargs)
    Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])


def _result_written_not_renamed(write_json_atomic, path, data) -> None:
    Path(path).with_name(f".{Path(path).name}.killed.tmp").write_text(json.dumps(data)[:1000])


def _work_folder_half_removed(clear, work, *args, **kwargs) -> None:
    (work.path / "row-measurements.json").unlink(missing_ok=True)
    shutil.rmtree(work.checkpoints()[-1][2])


@pytest.mark.parametrize("where", ["checkpoint tensors", "result file", "work folder removal"])
def test_a_crash_while_writing_resumes_to_the_same_result(where, tiny_suite, tmp_path, monkeypatch,
                                                          reference_runs):
    import safetensors.torch

    from cpt_bench.running import runner
    from cpt_bench.training import checkpoint

    reference = reference_runs("naive")
    out = tmp_path / "crashed"
    if where == "checkpoint tensors":  # the third checkpoint's tensor file, half written
        _crash_on_call(monkeypatch, safetensors.torch, "save_file", 3, _half_written_tensors)
    elif where == "result file":  # the result's temporary file half written, never renamed
        _crash_on_call(monkeypatch, runner, "write_json_atomic", 1, _result_written_not_renamed,
                       only=lambda path, data: Path(path).parent == out)
    else:  # the result is written; the work folder half removed
        _crash_on_call(monkeypatch, checkpoint.WorkDir, "clear", 1, _work_folder_half_removed)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, out, "naive")
    monkeypatch.undo()
    assert len(list(out.glob("*.json"))) == (1 if where == "work folder removal" else 0)
    resumed = run_tiny(tiny_suite, out, "naive")
    assert resumed.exit_code == 0, resumed.output
    assert_same_result(only_result(out), reference)
    assert not any((out / ".work").iterdir())


def _checkpoint_files(out: Path) -> list[Path]:
    return sorted(out.glob(".work/*/ckpt-*/state.safetensors"), key=lambda p: [int(x) for x in
                                                                              p.parent.name.split("-")[1:]])


def _zero_inside(path: Path, size: int = 64 * 1024) -> None:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - size // 2)
    data[start: start + size] = bytes(min(size, len(data) - start))
    path.write_bytes(bytes(data))


def test_a_checkpoint_zeroed_in_place_is_never_resumed_from(tiny_suite, tmp_path, monkeypatch, reference_runs):
    """Zeros over 64 KiB of the newest checkpoint's tensors (same size, valid header): the run passes over it,
    says so, resumes from the checkpoint before it, and publishes the uninterrupted result."""
    reference = reference_runs("naive")
    out = tmp_path / "crashed"
    crash_at_batch(monkeypatch, 7)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, out, "naive")
    monkeypatch.undo()
    files = _checkpoint_files(out)
    assert len(files) == 2  # the newest and the one to fall back to
    size = files[-1].stat().st_size
    _zero_inside(files[-1])
    assert files[-1].stat().st_size == size
    resumed = run_tiny(tiny_suite, out, "naive")
    assert resumed.exit_code == 0, resumed.output
    assert "damaged, not used" in resumed.output and "SHA-256" in resumed.output
    assert_same_result(only_result(out), reference)


@pytest.mark.parametrize("damage", ["replaced", "zeroed in place"])
def test_every_checkpoint_damaged_is_one_line_suggesting_fresh(damage, tiny_suite, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    crash_at_batch(monkeypatch, 7)
    with pytest.raises(Crash):
        run_tiny(tiny_suite, out, "naive")
    monkeypatch.undo()
    for path in _checkpoint_files(out):  # every one: a damaged newest alone falls back to the one before
        if damage == "replaced":
            path.write_bytes(b"not a safetensors file")
        else:
            _zero_inside(path)
    assert_one_line_error(run_tiny(tiny_suite, out, "naive"), "every checkpoint", "is damaged", "--fresh")
    assert not list(out.glob("*.json"))
    assert run_tiny(tiny_suite, out, "naive", "--fresh").exit_code == 0


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_a_damaged_row_measurements_file_is_set_aside_and_its_measurements_made_again(damage, tiny_suite, tmp_path,
                                                                              monkeypatch, reference_runs):
    from interruptions import crash_at_finetune

    reference = reference_runs("naive")
    out = tmp_path / "crashed"
    crash_at_finetune(monkeypatch, 3)  # inside the first row: row-measurements.json holds its first measurements
    with pytest.raises(Crash):
        run_tiny(tiny_suite, out, "naive")
    monkeypatch.undo()
    (progress,) = out.glob(".work/*/row-measurements.json")
    text = progress.read_bytes()
    progress.write_bytes(text[: len(text) // 2] if damage == "truncated" else
                         text[:20] + b"0" * (len(text) - 40) + text[-20:])
    resumed = run_tiny(tiny_suite, out, "naive")
    assert resumed.exit_code == 0, resumed.output
    assert "damaged, not used" in resumed.output and "row-measurements.json" in resumed.output
    assert_same_result(only_result(out), reference)


def test_a_second_identical_run_into_the_same_folder_is_refused(campaign, tmp_path, monkeypatch):
    tiny_suite, env, reference, _ = campaign
    monkeypatch.setenv("CPT_BENCH_CACHE", env["CPT_BENCH_CACHE"])
    out = tmp_path / "runs"
    first = subprocess.Popen(_command(tiny_suite, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".work/*/ckpt-*")):  # the first run is training
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # held mid-run, so the second surely starts while the first runs
    try:
        second = run_cli(*_command(tiny_suite, out)[3:])  # the same command, in this process
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, "the same run is already running", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0
    assert_same_result(only_result(out), reference)  # the first was not disturbed by the second
    assert not list(out.glob(".work/*"))  # done, and the lock is gone


def test_an_output_that_is_a_file_is_one_line(tiny_suite, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    for output in (target, target / "below"):
        assert_one_line_error(run_tiny(tiny_suite, output, "naive"), "--output", str(output))
    assert target.read_text() == "not a folder"


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True,
                             check=False).returncode == 0
    if not mounted:  # not root, or no mount rights: permission bits then bind the user
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a read-only folder here (root without mount rights)")
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o755)


def test_a_read_only_output_is_one_line_for_every_command(tiny_suite, tmp_path, read_only_folder,
                                                          reference_runs):
    assert_one_line_error(run_tiny(tiny_suite, read_only_folder, "naive"), "--output", "cannot write")
    assert_one_line_error(run_tiny(tiny_suite, read_only_folder / "sub", "naive"), "--output")
    reference_runs("naive")
    results = str(tmp_path / "reference-naive")
    assert_one_line_error(run_cli("report", results, "--output", str(read_only_folder / "t.md")), "--output")
    assert_one_line_error(run_cli("report", results, "--plots", str(read_only_folder / "plots")), "--plots")
    assert_one_line_error(run_cli("audit", "--suite", str(tiny_suite), "--output",
                                  str(read_only_folder / "audit.md")), "--output")


# ---------------------------------------------------------------- result files that are not sound, and copies


@pytest.fixture
def one_result(tmp_path, reference_runs) -> Path:
    reference_runs("naive")
    (path,) = (tmp_path / "reference-naive").glob("*.json")
    return path


@pytest.mark.parametrize("edit", [
    lambda r: r["metrics"].__setitem__("final_macro_f1", "0.9"),
    lambda r: r["matrix"]["macro_f1"][0].__setitem__(0, "high"),
    lambda r: r.__setitem__("seed", "0"),
    lambda r: r["stages"][0].__setitem__("seconds", None),
])
def test_a_result_file_with_values_of_the_wrong_type_is_skipped_in_one_line(edit, one_result, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = json.loads(one_result.read_text())
    bad = json.loads(one_result.read_text())
    edit(bad)
    bad["seed"] = 7 if isinstance(bad["seed"], int) else bad["seed"]  # not a copy of the good one
    (folder / "good.json").write_text(json.dumps(good))
    (folder / "bad.json").write_text(json.dumps(bad))
    result = run_cli("report", str(folder), "--format", "json")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "bad.json" in skipped[0] and "result.schema.json" in skipped[0], result.output
    assert_one_line_error(run_cli("report", str(folder / "bad.json")), "bad.json", "result.schema.json")
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "good.json").write_text(json.dumps(good))
    (reference / "tolerances.yaml").write_text("final_macro_f1: 1.0\n")
    check = run_cli("check", str(folder), "--reference", str(reference))
    assert check.exit_code == 0 and "Traceback" not in check.output, check.output
    assert "bad.json" in check.output and "no regression" in check.output


def test_a_copy_of_a_result_file_is_counted_once(one_result, tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    shutil.copy(one_result, folder / "a.json")
    copy = json.loads(one_result.read_text())
    copy["metrics"]["final_macro_f1"] = 0.123  # one field changed: still the same run (method, settings, seed)
    (folder / "b.json").write_text(json.dumps(copy))
    result = run_cli("report", str(folder), "--format", "json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("duplicate run")]
    assert len(warnings) == 1 and "b.json" in warnings[0] and "metrics differ" in warnings[0], result.stderr
    (row,) = json.loads(result.stdout)
    assert row["runs"] == 1 and row["final MF1 n"] == 1
    assert row["final MF1 mean"] == json.loads(one_result.read_text())["metrics"]["final_macro_f1"]


def test_a_work_folder_of_the_release_before_keeps_its_row_measurements(tmp_path):
    """A run interrupted under the previous release left `progress.json` (key "progress"): it is still read, and
    the next save replaces it with `row-measurements.json`."""
    from cpt_bench.training.checkpoint import WorkDir

    work = WorkDir(tmp_path / "run")
    measured = {"row": 1, "evaluations": {"task:cats": {"value": {"macro_f1": 0.5}, "rng": {"python": [1, 2]}}}}
    work.save_measurements(measured)
    saved = json.loads(work.measurements_file.read_text())
    work.measurements_file.unlink()
    (work.path / "progress.json").write_text(json.dumps({"sha256": saved["sha256"], "progress": saved["measurements"]}))
    assert WorkDir(tmp_path / "run").load_measurements() == measured
    work.save_measurements({**measured, "row": 2})
    assert not (work.path / "progress.json").exists() and work.load_measurements()["row"] == 2
