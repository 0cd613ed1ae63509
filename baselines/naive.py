"""Naive continual DAP (NCL): masked-LM training on each domain in turn, with nothing to protect old knowledge.

The lower bound every continual method must beat on forgetting (Ke et al. 2023, Sec. 4, "NCL").
"""

from cpt_bench.training.plugin import Method, register


@register
class Naive(Method):
    name = "naive"
    supports_fsdp = True
    aliases = ("ncl",)
    description = "continual DAP with no protection (the paper's NCL)"
