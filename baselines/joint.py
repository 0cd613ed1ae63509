"""Joint (multi-task) DAP: one stage on the union of all domains' corpora, the usual upper bound.

Trains T x (steps per domain) steps on the mixed corpora, so its token budget equals a continual run's.
Its matrix has one row (after the joint stage); forgetting and transfer are undefined (null).
"""

from cpt_bench.training.plugin import Method, register
from cpt_bench.training.stage import Stage


@register
class Joint(Method):
    name = "joint"
    supports_fsdp = True
    aliases = ("mtl",)
    description = "multi-task reference: one DAP stage on all domains mixed (same token budget)"

    def plan_stages(self, domains: list[str]) -> list[Stage]:
        return [Stage(name="joint", corpora=list(domains), steps_scale=len(domains))]
