"""A run's data without its model: suites (`suite`: the YAML files of tasks/), reading corpora and end tasks
(`texts`), LM blocks and masked or causal batches (`batches`), and the contamination audit (`audit`). Imports
only `cpt_bench.common`."""

import importlib
import warnings


def __getattr__(name: str):
    # `cpt_bench.data` was one module (now `cpt_bench.data.texts`): its names stay readable for one release
    texts = importlib.import_module("cpt_bench.data.texts")
    if hasattr(texts, name):
        warnings.warn(f"cpt_bench.data.{name} moved to cpt_bench.data.texts.{name}; the old name goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return getattr(texts, name)
    raise AttributeError(f"module 'cpt_bench.data' has no attribute {name!r}")
