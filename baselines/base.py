"""Base: the original LM with no DAP at all; end tasks fine-tuned from it (the matrix's `base` row)."""

from cpt_bench.training.plugin import Method, register


@register
class Base(Method):
    name = "base"
    supports_fsdp = True
    description = "no DAP: end tasks fine-tuned from the original model"
    trains_lm = False
