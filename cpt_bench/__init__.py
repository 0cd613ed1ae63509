"""cpt-bench: a benchmark harness for continual pre-training (domain-adaptive, masked or causal LM) of language
models.

The package is layered; a sub-package imports only those before it (tests/test_imports.py checks it):
`common` (errors, atomic writes, cache, settings) < `data` (suites, corpora, batches, audit) < `models`
(loading, unit map, FLOPs) < `training` (the method contract, the shared trainer, checkpoints) < `evaluation`
(end tasks, perplexity, the run-metric table) < `running` (plan, identity, runner, result files) < `report`
(report, gate, importance) < `sweeps` (grids, executors) < `cli`."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

LAYERS = ("common", "data", "models", "training", "evaluation", "running", "report", "sweeps", "cli")

# modules of the flat layout before the sub-packages, by their new place: importing an old name gives the same
# module object (with a DeprecationWarning) for one release, so plugins written against it keep working
MOVED_MODULES = {
    "errors": "common.errors", "atomic": "common.atomic", "cache": "common.cache", "rng": "common.rng",
    "settings": "common.settings", "progress": "common.progress", "batches": "data.batches",
    "audit": "data.audit", "suite": "data.suite", "units": "models.units", "compute": "models.compute",
    "plugin": "training.plugin", "stage": "training.stage", "optim": "training.optim",
    "trainer": "training.trainer", "checkpoint": "training.checkpoint", "head_warmup": "training.head_warmup",
    "adapters": "training.adapters", "evaluator": "evaluation.evaluator", "perplexity": "evaluation.perplexity",
    "metrics": "evaluation.metrics", "plan": "running.plan", "identity": "running.identity",
    "runner": "running.runner", "results": "running.results", "tracking": "running.tracking",
    "bench": "running.bench", "synthetic": "running.synthetic", "check": "report.check", "stats": "report.stats",
    "importance": "report.importance", "sweep": "sweeps.grid", "executors": "sweeps.executors",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(__name__ + ".")
        if fullname.startswith(__name__ + ".") and old in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED_MODULES[spec.name.removeprefix(__name__ + '.')]}"
        warnings.warn(f"{spec.name} moved to {new}; the old name goes in the next release", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module is the moved one, already executed


sys.meta_path.append(_MovedModuleFinder())
