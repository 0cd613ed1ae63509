"""A run's data without its model: suites (`suite`: the YAML files of tasks/), reading corpora and end tasks
(`texts`), LM blocks and masked or causal batches (`batches`), and the contamination audit (`audit`). Imports
only `cpt_bench.common`."""

from cpt_bench.common.deprecation import forward_to

# `cpt_bench.data` was one module (now `cpt_bench.data.texts`): its names stay readable from here for one release
__getattr__ = forward_to("cpt_bench.data", "texts")
