"""The language models: loading a checkpoint or a built-in model and its LM loss (`loading`), the map of
attention heads and FFN neurons that importance and masks address (`units`), and the FLOPs of a pass
(`compute`). Imports `cpt_bench.common` and `cpt_bench.data` only."""

from cpt_bench.common.deprecation import forward_to

# `cpt_bench.models` was one module (now `cpt_bench.models.loading`): its names stay readable from here for one release
__getattr__ = forward_to("cpt_bench.models", "loading")
