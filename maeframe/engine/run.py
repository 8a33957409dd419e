"""`task:` -> the engine that runs it: the one dispatcher (`maeframe run` and `maeframe compare` use it)."""
from __future__ import annotations

from typing import Any

from ..build import Prepared


def make_task(prepared: Prepared, resume: bool = False):
    """The run a prepared recipe describes, built (data, model, run directory checked) and ready to `train()`:
    `Pretrainer` (`JointPretrainer` for a joint recipe), `FineTuner`, `LinearProbe`, `KnnTask` or `RetrievalTask`."""
    from .finetune import FineTuner
    from .joint_pretrain import JointPretrainer
    from .knn_eval import KnnTask
    from .linprobe import LinearProbe
    from .pretrain import Pretrainer
    from .retrieval_eval import RetrievalTask

    engines = {"pretrain": JointPretrainer if prepared.joint else Pretrainer, "finetune": FineTuner,
               "linprobe": LinearProbe, "knn": KnnTask, "retrieval": RetrievalTask}
    return engines[prepared.recipe.task](prepared, resume=resume)


def run_task(prepared: Prepared, resume: bool = False) -> dict[str, Any]:
    """Build and run a recipe of any task; returns its final metrics (pretraining) or results (downstream)."""
    return make_task(prepared, resume).train()
