"""The `cpt-bench` command line (CONTRACT.md)."""

from __future__ import annotations

import functools
import itertools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cpt_bench.common.errors import BadInput, TrainingFailed

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark continual pre-training (domain-adaptive, masked or causal LM) of language models.")


def exits_2_on_bad_input(fn):
    """Bad input is one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except TrainingFailed as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
        except OSError as error:  # a disk that filled up or went read-only mid-run: one line, no half-written file
            where = f"{error.filename}: " if error.filename else ""
            typer.echo(f"error: {where}{error.strerror or error}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command("list")
@exits_2_on_bad_input
def list_command(what: Annotated[str, typer.Argument(help="methods or suites")]) -> None:
    """List registered methods or suites, one line each."""
    if what == "methods":
        from cpt_bench.training.plugin import BROKEN_PLUGINS, registered_methods

        for name, cls in sorted(registered_methods().items()):
            alias = f" (alias: {', '.join(cls.aliases)})" if cls.aliases else ""
            typer.echo(f"{name:<12} {cls.description}{alias}")
        for module, why in sorted(BROKEN_PLUGINS.items()):
            typer.echo(f"warning: plugin {module} failed to load: {why}", err=True)
    elif what == "suites":
        from cpt_bench.data.suite import registered_suite_files, suite_summary

        for name in sorted(registered_suite_files()):
            typer.echo(f"{name:<12} {suite_summary(name)}")
    else:
        raise BadInput(f"cannot list {what!r} (use: methods, suites)")


@app.command()
@exits_2_on_bad_input
def run(
    method: Annotated[str, typer.Option(help="registered method (cpt-bench list methods)")],
    suite: Annotated[str | None, typer.Option(help="registered suite name or suite YAML path")] = None,
    order: Annotated[str | None, typer.Option(help="domain order: comma-separated names, or NAME:K for row K "
                                                      "of a suite's named orders (das6: paper:0..4)")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="run seed (repeatable: one run per seed)")] = None,
    model: Annotated[str | None, typer.Option(help="HF id, local dir or alias")] = None,
    data_dir: Annotated[str | None, typer.Option(help="root folder of the suite's data files")] = None,
    steps: Annotated[int | None, typer.Option(help="DAP optimizer steps per domain")] = None,
    output: Annotated[str, typer.Option(help="folder for result files")] = "results/runs",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    eval: Annotated[str, typer.Option("--eval", help="full (paper protocol) or final")] = "full",
    limit: Annotated[int | None, typer.Option(help="cap every split and corpus at N examples")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override, e.g. dap.lr=1e-4")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="optimizer steps between mid-stage checkpoints "
                                                       "(0: at stage ends only)")] = 500,
    fresh: Annotated[bool, typer.Option(help="start over: delete this run's checkpoints instead of resuming")
                     ] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow a model checkpoint to run its own Python code "
                                                         "(off: such a model is refused)")] = False,
    report_to: Annotated[str, typer.Option(help="experiment tracker: tensorboard, wandb, mlflow or none (files "
                                                "under OUTPUT/trackers; W&B offline without credentials)")] = "none",
) -> None:
    """Continual DAP over a suite's domains, end-task evaluation, one result file per seed.

    An interrupted run (crash, SIGKILL, SIGINT/SIGTERM) continues from its last checkpoint when the same
    command is run again (checkpoints live in OUTPUT/.work/ until the result file is written)."""
    from cpt_bench.common.atomic import check_writable_folder
    from cpt_bench.data.suite import DEFAULT_SUITE
    from cpt_bench.running.plan import RunRequest, check_distributed, make_accelerator, plan_data, plans_by_seed
    from cpt_bench.running.runner import execute
    from cpt_bench.training.checkpoint import StopRequested, StopSignal

    _quiet_libraries()
    request = RunRequest(
        method=method, suite=suite or DEFAULT_SUITE,
        order=[d.strip() for d in order.split(",")] if order is not None else None,
        seeds=seed or [0], model=model, data_dir=data_dir, steps=steps, output=output, device=device,
        eval=eval, limit=limit, sets=set_ or [], show_progress=not quiet,
        checkpoint_every=checkpoint_every, fresh=fresh, trust_remote_code=trust_remote_code, report_to=report_to,
    )
    check_writable_folder(Path(output), "--output")
    loaded: dict = {}  # the data, read once for the accelerator's settings and every seed's plan
    accelerator = make_accelerator(plan_data(request, loaded))  # options and data checked before the model loads
    plans = plans_by_seed(request, accelerator, loaded)
    first = next(plans)  # every option checked before any work
    check_distributed(first[1], accelerator)
    # several processes agree on a stop (any one's signal stops all at the same step) and are checkpointed alike
    with StopSignal().across(accelerator) as stop:
        for one_seed, plan in itertools.chain([first], plans):
            try:
                run = execute(plan, one_seed, accelerator, stop)
            except StopRequested as stopped:
                typer.echo(f"interrupted: {stopped}; checkpoint saved. Run the same command again to resume "
                           f"(or add --fresh to start over).", err=True)
                raise typer.Exit(130) from None
            if accelerator.is_main_process:
                _print_summary(run.result, run.path)


def _print_summary(result: dict, path: Path) -> None:
    from tabulate import tabulate

    rows = [[key, "null" if value is None else f"{value:.4f}"] for key, value in result["metrics"].items()]
    for name, probe in result["probes"].items():
        if probe["stages"]:
            rows.append([f"probe {name} (base → last)", f"{probe['base']:.4f} → {probe['stages'][-1]:.4f}"])
    seconds = sum(s["seconds"] for s in result["stages"])
    rows.append(["DAP seconds", f"{seconds:.1f}"])
    typer.echo(f"\n{result['method']} on {result['suite']} ({','.join(result['domains'])}), seed {result['seed']}")
    typer.echo(tabulate(rows, tablefmt="simple"))
    typer.echo(f"result file: {path}")


@app.command()
@exits_2_on_bad_input
def report(
    paths: Annotated[list[str] | None, typer.Argument(help="result files or folders")] = None,
    format: Annotated[str, typer.Option("--format", help="markdown, latex, csv, json or html")] = "markdown",
    output: Annotated[str | None, typer.Option(help="write the table to this file")] = None,
    by_order: Annotated[bool, typer.Option("--by-order", help="one row per domain order (default: "
                                                               "average over orders, as paper tables do)")] = False,
    plots: Annotated[str | None, typer.Option(help="also write PNG plots into this folder")] = None,
) -> None:
    """Aggregate result files: one row per method and configuration, mean ± std over seeds and orders."""
    from cpt_bench.common.atomic import check_writable_file, check_writable_folder, write_text_atomic
    from cpt_bench.report.formats import report as make_report

    if output:
        check_writable_file(Path(output), "--output")
    if plots:
        check_writable_folder(Path(plots), "--plots")
    text = make_report(paths or ["results/runs"], format, by_order=by_order, plots_dir=plots)
    if output:
        write_text_atomic(Path(output), text + "\n")
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text)
    if plots:
        typer.echo(f"plots in {plots}")


@app.command()
@exits_2_on_bad_input
def check(
    paths: Annotated[list[str], typer.Argument(help="result files or folders to check")],
    reference: Annotated[str, typer.Option(help="folder of reference result files and tolerances.yaml")] =
    "results/reference",
) -> None:
    """Regression gate: exit 1 naming every (method, metric) worse than the reference beyond its tolerance."""
    from cpt_bench.report.check import check as run_check

    findings, notes = run_check(paths, reference)
    for note in notes:
        typer.echo(note)
    for finding in findings:
        typer.echo(finding.line())
    regressions = [f for f in findings if f.regressed]
    if regressions:
        named = ", ".join(f"{f.method}/{f.metric}" for f in regressions)
        typer.echo(f"{len(regressions)} regression(s): {named}")
        raise typer.Exit(1)
    typer.echo(f"no regression ({len(findings)} checks)")


@app.command()
@exits_2_on_bad_input
def bench(
    suite: Annotated[str | None, typer.Option(help="suite whose first domain's blocks are used")] = None,
    data_dir: Annotated[str | None, typer.Option(help="root folder of the suite's data files")] = None,
    order: Annotated[str | None, typer.Option(help="domain order (comma-separated); its first domain's "
                                                      "blocks are used")] = None,
    model: Annotated[str | None, typer.Option(help="model (default: the suite's)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per step (default: the suite's)")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per row (default: the suite's)")] = None,
    steps: Annotated[int, typer.Option(help="timed steps per measurement (after 3 warm-up steps)")] = 20,
    repeats: Annotated[int, typer.Option(help="alternating repeats of each kind")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="block.key=value for every kind")] = None,
    variant: Annotated[list[str] | None, typer.Option(
        help="an extra kind, METHOD or METHOD:block.key=value,... (e.g. softmask:softmask.contrastive=false)")] = None,
    json_file: Annotated[str | None, typer.Option("--json", help="write the numbers to this JSON file")] = None,
    profile: Annotated[bool, typer.Option(
        help="instead of timing: each kind once under torch.profiler (time in matrix products, top operators)")
    ] = False,
) -> None:
    """Side-by-side step speed: transformers.Trainer vs our naive step vs softmask; peak memory; importance."""
    from cpt_bench.common.atomic import write_json_atomic
    from cpt_bench.data.suite import DEFAULT_SUITE
    from cpt_bench.running.bench import BenchRequest, plan_for, profile_report, run_bench, table

    _quiet_libraries()
    if steps < 2 or repeats < 1:
        raise BadInput("--steps must be at least 2 and --repeats at least 1")
    if profile and json_file:  # the benchmark file has the timing run's keys (CONTRACT.md); a profile has none
        raise BadInput("--json writes the timing run's numbers; --profile prints its tables instead (redirect them)")
    request = BenchRequest(suite=suite or DEFAULT_SUITE, data_dir=data_dir, model=model, batch_size=batch_size,
                           order=[d.strip() for d in order.split(",")] if order is not None else None,
                           seq_len=seq_len, steps=steps, repeats=repeats, device=device, sets=list(set_ or []),
                           variants=list(variant or []))
    if json_file:
        from cpt_bench.common.atomic import check_writable_file

        check_writable_file(Path(json_file), "--json")
    for kind in request.kinds:  # bad input (suite, model, sizes, settings) fails here, in one line, before any process
        plan_for(request, kind)
    if profile:
        typer.echo(profile_report(request, list(request.kinds))[0])
        return
    result = run_bench(request, echo=typer.echo)
    typer.echo(table(result))
    if json_file:
        write_json_atomic(Path(json_file), result)
        typer.echo(f"wrote {json_file}")


@app.command()
@exits_2_on_bad_input
def audit(
    suite: Annotated[str | None, typer.Option(help="registered suite name or suite YAML path")] = None,
    data_dir: Annotated[str | None, typer.Option(help="root folder of the suite's data files")] = None,
    order: Annotated[str | None, typer.Option(help="the domains to audit (comma-separated; default: all)")] = None,
    limit: Annotated[int | None, typer.Option(help="cap every split and corpus at N examples")] = None,
    output: Annotated[str | None, typer.Option(help="also write the table (markdown) to this file")] = None,
) -> None:
    """Contamination audit: for every (DAP corpus, end-task split) pair, the texts that share a 13-gram with the
    corpus and the exact duplicates."""
    from cpt_bench.common.atomic import check_writable_file, write_text_atomic
    from cpt_bench.data.audit import table, warnings
    from cpt_bench.data.suite import DEFAULT_SUITE
    from cpt_bench.running.run_data import read_suite_data

    _quiet_libraries()
    if output:
        check_writable_file(Path(output), "--output")
    rows = read_suite_data(suite or DEFAULT_SUITE, [d.strip() for d in order.split(",")] if order is not None else None,
                           data_dir, limit).audit
    text = table(rows)
    typer.echo(text)
    for line in warnings(rows):
        typer.echo(line, err=True)
    if output:
        write_text_atomic(Path(output), text + "\n")
        typer.echo(f"wrote {output}")


@app.command()
@exits_2_on_bad_input
def importance(
    result: Annotated[str, typer.Argument(help="result file of a soft-masking run")],
    output: Annotated[str | None, typer.Option(help="PNG path (default: <result stem>.importance.png)")] = None,
) -> None:
    """Per-layer summary of a soft-masking run's unit importances, and a heatmap PNG."""
    from cpt_bench.common.atomic import check_writable_file
    from cpt_bench.report.importance import default_png_path, load_importances, summary_text, write_png

    png = Path(output) if output else default_png_path(Path(result))
    check_writable_file(png, "--output")
    run_importances = load_importances(Path(result))
    typer.echo(summary_text(run_importances))
    write_png(run_importances, png)
    typer.echo(f"\nheatmap PNG: {png}")


@app.command()
@exits_2_on_bad_input
def sweep(
    grid_file: Annotated[str, typer.Argument(metavar="GRID.yaml", help="grid file (or: status GRID.yaml)")],
    status_of: Annotated[str | None, typer.Argument(metavar="[GRID.yaml]", help="with `status`: the grid file",
                                                    show_default=False)] = None,
    executor: Annotated[str, typer.Option(help="local (worker processes here) or slurm (a job array); "
                                               "cpt_bench/sweeps/executors")] = "local",
    max_parallel: Annotated[int, typer.Option(help="runs at once (local: each gets floor(cores / N) threads; "
                                                   "slurm: the array's parallelism)")] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan: every run, its state and command")
                       ] = False,
    wait: Annotated[bool, typer.Option(help="wait for the runs to end (--no-wait: submit and return, where the "
                                           "executor queues jobs, as slurm does)")] = True,
) -> None:
    """Run a grid of methods × orders × seeds × settings (docs/sweeps.md), skipping finished runs and resuming
    interrupted ones; `cpt-bench sweep status GRID.yaml` prints the state of every run."""
    import shlex

    from cpt_bench.sweeps.executors import executor_named, pending_runs, run_status, status_table
    from cpt_bench.sweeps.grid import load_grid, write_report

    if grid_file == "status":
        if status_of is None:
            raise BadInput("sweep status: give the grid file (cpt-bench sweep status GRID.yaml)")
        typer.echo(status_table(load_grid(status_of)))
        return
    if status_of is not None:
        raise BadInput(f"sweep: one grid file, got {grid_file!r} and {status_of!r} (or: sweep status GRID.yaml)")
    chosen = executor_named(executor)
    if max_parallel < 1:
        raise BadInput(f"--max-parallel must be at least 1, got {max_parallel}")
    grid = load_grid(grid_file)  # every run checked before anything starts
    if not dry_run:
        from cpt_bench.common.atomic import check_writable_folder

        check_writable_folder(grid.output, f"{grid_file}: output")
    chosen.check()
    if dry_run:
        for run in grid.runs:
            state, detail = run_status(grid, run)
            typer.echo(f"{run.label}: {state} ({detail})\n    {shlex.join(run.command)}")
        pending = len(pending_runs(grid))
        typer.echo(f"{len(grid.runs)} runs, {pending} to run ({executor}, {max_parallel} at once); nothing started")
        return
    not_done = chosen.execute(grid, pending_runs(grid), max_parallel, typer.echo, wait=wait)
    if not_done is None:  # submitted, not waited for: `cpt-bench sweep status` follows the runs
        return
    write_report(grid, typer.echo)
    if not_done:
        for run in not_done:
            state, detail = run_status(grid, run)
            typer.echo(f"not done: {run.label}: {state}: {detail} (log: {grid.log_file(run)})", err=True)
        raise typer.Exit(1)
    typer.echo(f"all {len(grid.runs)} runs done")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
