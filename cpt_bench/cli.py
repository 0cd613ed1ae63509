"""The `cpt-bench` command line (CONTRACT.md)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cpt_bench.errors import BadInput

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark continual pre-training (domain-adaptive MLM) of language models.")


def exits_2_on_bad_input(fn):
    """Bad input is one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("list")
@exits_2_on_bad_input
def list_command(what: Annotated[str, typer.Argument(help="methods or suites")]) -> None:
    """List registered methods or suites, one line each."""
    if what == "methods":
        from cpt_bench.plugin import METHODS, load_plugins

        load_plugins()
        for name, cls in sorted(METHODS.items()):
            alias = f" (alias: {', '.join(cls.aliases)})" if cls.aliases else ""
            typer.echo(f"{name:<12} {cls.description}{alias}")
    elif what == "suites":
        from cpt_bench.suite import registered_suite_files, suite_summary

        for name in sorted(registered_suite_files()):
            typer.echo(f"{name:<12} {suite_summary(name)}")
    else:
        raise BadInput(f"cannot list {what!r} (use: methods, suites)")


@app.command()
@exits_2_on_bad_input
def run(
    method: Annotated[str, typer.Option(help="registered method (cpt-bench list methods)")],
    suite: Annotated[Optional[str], typer.Option(help="registered suite name or suite YAML path")] = None,
    order: Annotated[Optional[str], typer.Option(help="domain order, comma-separated names")] = None,
    seed: Annotated[Optional[list[int]], typer.Option(help="run seed (repeatable: one run per seed)")] = None,
    model: Annotated[Optional[str], typer.Option(help="HF id, local dir or alias")] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="root folder of the suite's data files")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DAP optimizer steps per domain")] = None,
    output: Annotated[str, typer.Option(help="folder for result files")] = "results/runs",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    eval: Annotated[str, typer.Option("--eval", help="full (paper protocol) or final")] = "full",
    limit: Annotated[Optional[int], typer.Option(help="cap every split and corpus at N examples")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE override, e.g. dap.lr=1e-4")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Continual DAP over a suite's domains, end-task evaluation, one result file per seed."""
    from cpt_bench.runner import RunRequest, execute, make_accelerator, plan_run
    from cpt_bench.results import write_artifacts, write_json_atomic
    from cpt_bench.suite import DEFAULT_SUITE

    _quiet_libraries()
    request = RunRequest(
        method=method, suite=suite or DEFAULT_SUITE,
        order=[d.strip() for d in order.split(",")] if order is not None else None,
        seeds=seed or [0], model=model, data_dir=data_dir, steps=steps, output=output, device=device,
        eval=eval, limit=limit, sets=set_ or [], show_progress=not quiet,
    )
    plan = plan_run(request)
    accelerator = make_accelerator(plan)
    for one_seed in request.seeds:
        path, result, artifacts = execute(plan, one_seed, accelerator)
        if accelerator.is_main_process:
            result["artifacts"] = write_artifacts(path, artifacts)  # before the result: it marks completion
            write_json_atomic(path, result)
            _print_summary(result, path)


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
    paths: Annotated[Optional[list[str]], typer.Argument(help="result files or folders")] = None,
    format: Annotated[str, typer.Option("--format", help="markdown, csv or json")] = "markdown",
    output: Annotated[Optional[str], typer.Option(help="write the table to this file")] = None,
) -> None:
    """Aggregate result files: mean ± std over seeds per (suite, method, order)."""
    from cpt_bench.report import report as make_report
    from cpt_bench.results import write_text_atomic

    text = make_report(paths or ["results/runs"], format)
    if output:
        write_text_atomic(Path(output), text + "\n")
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text)


@app.command()
@exits_2_on_bad_input
def importance(
    result: Annotated[str, typer.Argument(help="result file of a soft-masking run")],
    output: Annotated[Optional[str], typer.Option(help="PNG path (default: <result stem>.importance.png)")] = None,
) -> None:
    """Per-layer summary of a soft-masking run's unit importances, and a heatmap PNG."""
    from cpt_bench.importance import default_png_path, load_importances, summary_text, write_png

    run_importances = load_importances(Path(result))
    typer.echo(summary_text(run_importances))
    png = Path(output) if output else default_png_path(Path(result))
    write_png(run_importances, png)
    typer.echo(f"\nheatmap PNG: {png}")


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
