"""Inspect a soft-masking run's unit importances (`cpt-bench importance RESULT`): per-layer tables and a PNG.

The importance artifact (methods/softmask.py, `artifacts()`) holds tensors named
`"{index:02d}:{stage}/{normalised|accumulated}/{kind}"`, each [layers, units] with values in [0, 1]:
`normalised` is one stage's own importance, `accumulated` the element-wise max over it and every stage before.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from cpt_bench.common.errors import BadInput
from cpt_bench.models.units import UNIT_KINDS

# A unit above this keeps less than half of its update under soft-masking (updates are scaled by
# 1 - accumulated importance, Sec. 3.2): the units a stage "claims".
THRESHOLD = 0.5
NEURON_KINDS = ("intermediate", "output")
_NAME = re.compile(r"^(\d+):(.+)/(normalised|accumulated)/(" + "|".join(UNIT_KINDS) + r")$")


@dataclasses.dataclass
class StageImportance:
    """One importance computation: `general` (before the first domain) or a domain, in the order computed."""

    name: str
    normalised: dict[str, torch.Tensor]  # kind -> [layers, units]
    accumulated: dict[str, torch.Tensor]


@dataclasses.dataclass
class RunImportances:
    result_path: Path
    result: dict[str, Any]
    artifact_path: Path
    stages: list[StageImportance]

    @property
    def num_layers(self) -> int:
        return self.stages[0].normalised["head"].shape[0]

    @property
    def sizes(self) -> dict[str, int]:
        return {kind: self.stages[0].normalised[kind].shape[1] for kind in UNIT_KINDS}


def load_importances(result_path: Path) -> RunImportances:
    """A result file and its importance artifact, checked; every problem is a one-line BadInput."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cpt_bench.running.results import load_result

    if not result_path.is_file():
        raise BadInput(f"result file {result_path} does not exist")
    try:
        result = load_result(result_path)
    except (OSError, ValueError) as error:  # JSON and decoding errors are ValueErrors
        raise BadInput(f"{result_path} is not a result file ({error})") from None
    artifacts = result.get("artifacts")
    name = artifacts.get("importance") if isinstance(artifacts, dict) else None
    if name is None:
        raise BadInput(f"result {result_path} has no importance artifact (only soft-masking runs have one)")
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise BadInput(f"result {result_path}: artifacts.importance must be a file name, got {name!r}")
    artifact_path = result_path.with_name(name)
    if not artifact_path.is_file():
        raise BadInput(f"importance file {artifact_path} (named by result {result_path}) does not exist")
    try:
        tensors = load_file(artifact_path)
    except (OSError, SafetensorError) as error:
        raise BadInput(f"importance file {artifact_path} is not readable safetensors ({error})") from None
    return RunImportances(result_path, result, artifact_path, parse_stages(tensors, artifact_path))


def parse_stages(tensors: dict[str, torch.Tensor], where: Path | str) -> list[StageImportance]:
    """Tensors named `"{index:02d}:{stage}/{normalised|accumulated}/{kind}"` -> stages in index order."""
    if not tensors:
        raise BadInput(f"importance file {where} holds no tensors")
    names: dict[int, str] = {}
    found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _NAME.match(key)
        if match is None:
            raise BadInput(f"importance file {where}: tensor name {key!r} is not "
                           f"'INDEX:STAGE/normalised|accumulated/{'|'.join(UNIT_KINDS)}'")
        index, stage, which, kind = int(match[1]), match[2], match[3], match[4]
        if names.setdefault(index, stage) != stage:
            raise BadInput(f"importance file {where}: index {index:02d} names two stages "
                           f"({names[index]!r} and {stage!r})")
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise BadInput(f"importance file {where}: tensor {key!r} is not a 2-D float tensor "
                           f"(shape {list(tensor.shape)}, {tensor.dtype})")
        values = tensor.float()
        if not bool(((values >= 0) & (values <= 1)).all()):
            raise BadInput(f"importance file {where}: tensor {key!r} has values outside [0, 1]")
        found.setdefault(index, {}).setdefault(which, {})[kind] = values
    if sorted(found) != list(range(len(found))):
        raise BadInput(f"importance file {where}: stage indices {sorted(found)} are not 0..{len(found) - 1}")
    stages = []
    for index in range(len(found)):
        for which in ("normalised", "accumulated"):
            missing = [k for k in UNIT_KINDS if k not in found[index].get(which, {})]
            if missing:
                raise BadInput(f"importance file {where}: stage {index:02d}:{names[index]} lacks "
                               f"{which}/{', '.join(missing)}")
        stages.append(StageImportance(names[index], found[index]["normalised"], found[index]["accumulated"]))
    first = stages[0].normalised
    layers = first["head"].shape[0]
    for stage, which in itertools.product(stages, ("normalised", "accumulated")):
        for kind, tensor in getattr(stage, which).items():
            if tensor.shape[0] != layers or tensor.shape != first[kind].shape:
                raise BadInput(f"importance file {where}: {stage.name}/{which}/{kind} has shape "
                               f"{list(tensor.shape)}, expected [{layers}, {first[kind].shape[1]}]")
    return stages


# ---- summary

def layer_summary(stages: list[StageImportance]) -> list[dict[str, Any]]:
    """Per stage, kind and layer: mean normalised importance and the fraction of units above THRESHOLD."""
    rows = []
    for stage in stages:
        for kind in UNIT_KINDS:
            values = stage.normalised[kind]
            means, above = values.mean(dim=1), (values > THRESHOLD).float().mean(dim=1)
            for layer in range(values.shape[0]):
                rows.append({"stage": stage.name, "kind": kind, "layer": layer,
                             "mean": float(means[layer]), "above": float(above[layer])})
    return rows


def accumulated_above(stages: list[StageImportance]) -> dict[str, list[float]]:
    """Per kind and layer: the fraction of units whose accumulated importance after the last stage is above
    THRESHOLD (the units that later training would barely move)."""
    return {kind: (values > THRESHOLD).float().mean(dim=1).tolist()
            for kind, values in stages[-1].accumulated.items()}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """|A ∩ B| / |A ∪ B| of two boolean masks; None when both are empty (undefined, not 0)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else None


def stage_overlaps(stages: list[StageImportance]) -> list[tuple[str, str, dict[str, float | None]]]:
    """For every pair of stages, per kind: Jaccard overlap of their units with normalised importance above."""
    return [(first.name, second.name,
             {kind: jaccard(first.normalised[kind] > THRESHOLD, second.normalised[kind] > THRESHOLD)
              for kind in UNIT_KINDS})
            for first, second in itertools.combinations(stages, 2)]


def summary_text(run: RunImportances) -> str:
    """The readable tables printed by `cpt-bench importance`."""
    from tabulate import tabulate

    result, stages = run.result, run.stages
    sizes = run.sizes
    domains = ",".join(map(str, result["domains"]))
    lines = [(f"importances of {result['method']} on {result['suite']} ({domains}), "
              f"seed {result['seed']}: {run.artifact_path}"),
             (f"{run.num_layers} layers; units per layer: {sizes['head']} heads, "
              f"{sizes['intermediate']} intermediate, {sizes['output']} output; "
              f"stages: {', '.join(s.name for s in stages)}"),
             f"mean = mean normalised importance; >{THRESHOLD} = fraction of units above {THRESHOLD}"]
    rows = layer_summary(stages)
    accumulated = accumulated_above(stages)
    for kind in UNIT_KINDS:
        # two-line headers keep the table narrow with many stages
        headers = ["layer"] + [f"{s.name}\n{label}" for s in stages for label in ("mean", f">{THRESHOLD}")]
        headers.append(f"accumulated\n>{THRESHOLD}")
        cells: dict[int, list[Any]] = {layer: [layer] for layer in range(run.num_layers)}
        for row in rows:  # in stage order
            if row["kind"] == kind:
                cells[row["layer"]] += [row["mean"], row["above"]]
        table = [[*cells[layer], accumulated[kind][layer]] for layer in range(run.num_layers)]
        lines += ["", f"{kind} units ({sizes[kind]} per layer)",
                  tabulate(table, headers=headers, floatfmt=".3f", tablefmt="simple")]
    overlaps = stage_overlaps(stages)
    if overlaps:
        table = [[a, b, *("n/a" if o[k] is None else f"{o[k]:.3f}" for k in UNIT_KINDS)]
                 for a, b, o in overlaps]
        lines += ["", (f"overlap between stages (Jaccard of units above {THRESHOLD}, all layers; "
                       "n/a = neither stage has such units)"),
                  tabulate(table, headers=["stage", "stage", *UNIT_KINDS], tablefmt="simple",
                           disable_numparse=True)]
    return "\n".join(lines)


# ---- figure

def default_png_path(result_path: Path) -> Path:
    return result_path.with_name(f"{result_path.stem}.importance.png")


def write_png(run: RunImportances, path: Path) -> None:
    """Head heatmaps (layers x heads) per stage and accumulated after the last; then per layer, histograms
    of the intermediate and output neuron importances of every stage."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    stages, layers = run.stages, run.num_layers
    panels = [(s.name, s.normalised["head"]) for s in stages]
    panels.append((f"accumulated after {stages[-1].name}", stages[-1].accumulated["head"]))
    width = max(3.0 * len(panels), 8.0)
    figure = Figure(figsize=(width, 3.2 + 2.0 * layers), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg without touching pyplot's global backend
    top, bottom = figure.subfigures(2, 1, height_ratios=[3.2, 2.0 * layers])
    top.suptitle(f"head importance (normalised per stage): {run.result_path.name}", fontsize="medium")
    axes = top.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, values) in zip(axes, panels, strict=True):
        image = axis.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                            interpolation="nearest")
        axis.set_title(title, fontsize="small")
        axis.set_xlabel("head")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("layer")
    top.colorbar(image, ax=list(axes), shrink=0.9, label="importance")

    bottom.suptitle("neuron importance per layer (normalised), over stages", fontsize="medium")
    grid = bottom.subplots(layers, len(NEURON_KINDS), squeeze=False, sharex=True)
    bins = np.linspace(0.0, 1.0, 21)
    for layer, kind_index in itertools.product(range(layers), range(len(NEURON_KINDS))):
        axis, kind = grid[layer][kind_index], NEURON_KINDS[kind_index]
        for stage in stages:
            counts, _ = np.histogram(stage.normalised[kind][layer].numpy(), bins=bins)
            axis.stairs(counts, bins, label=stage.name)  # much faster than axis.hist with many panels
        axis.axvline(THRESHOLD, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"layer {layer}, {kind}", fontsize="small")
        axis.set_ylabel("units")
        axis.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    for axis in grid[-1]:
        axis.set_xlabel("importance")
    grid[0][0].legend(fontsize="x-small")
    _save_atomic(figure, path)


def _save_atomic(figure, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise BadInput(f"cannot write {path} ({error.strerror or error})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

