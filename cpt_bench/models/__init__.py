"""The language models: loading a checkpoint or a built-in model and its LM loss (`loading`), the map of
attention heads and FFN neurons that importance and masks address (`units`), and the FLOPs of a pass
(`compute`). Imports `cpt_bench.common` and `cpt_bench.data` only."""

import importlib
import warnings


def __getattr__(name: str):
    # `cpt_bench.models` was one module (now `cpt_bench.models.loading`): its names stay readable for one release
    loading = importlib.import_module("cpt_bench.models.loading")
    if hasattr(loading, name):
        warnings.warn(f"cpt_bench.models.{name} moved to cpt_bench.models.loading.{name}; the old name goes in the "
                      "next release", DeprecationWarning, stacklevel=2)
        return getattr(loading, name)
    raise AttributeError(f"module 'cpt_bench.models' has no attribute {name!r}")
