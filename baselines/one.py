"""ONE: each domain DAP-trained separately, always from the original model (Ke et al. 2023, Sec. 4).

The non-continual reference: no forgetting and no transfer by construction; its matrix holds the diagonal only
(stage i's model knows domain i alone), so forgetting is undefined (null).
"""

import torch

from cpt_bench.training.plugin import Method, register


@register
class One(Method):
    name = "one"
    supports_fsdp = True
    description = "non-continual reference: every domain DAP-trained from the original model"

    def before_sequence(self, sequence) -> None:
        self.original = {k: v.detach().clone() for k, v in sequence.model.state_dict().items()}

    def before_first_step(self, stage) -> None:
        if stage.resumed:  # inside a stage: its weights are the checkpoint's, already trained from the original
            return
        with torch.no_grad():
            stage.model.load_state_dict(self.original)

    def end_tasks_to_evaluate(self, stage_index: int, scheduled: list[int]) -> list[int]:
        return [stage_index]  # only this stage's domain: the model has seen no other
