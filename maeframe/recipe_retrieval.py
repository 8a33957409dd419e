"""The schema of `task: retrieval` recipes (engine: `engine/retrieval_eval.py`): cross-modal retrieval and per-modality
k-NN on a joint checkpoint. The tokenizers, model and modality names come from the checkpoint's own recipe; this
recipe names the checkpoint, the data (a paired dataset: training pairs as the k-NN bank, held-out pairs as the
queries) and the metrics. Imported by `recipe.py`, which puts `RetrievalRecipe` in the union of recipes."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .recipe import UNUSED_REASON, UNUSED_RUNTIME_FIELDS, DownstreamDataConfig, RuntimeConfig
from .recipe_base import Seed, Strict


class RetrievalInit(Strict):
    checkpoint: str = Field(description="a joint pretraining checkpoint trained with mixing: paired (e.g. "
                                        "runs/cav_mae_klettres/last.pt); its recipe fixes tokenizers, model and "
                                        "modality names")
    random_weights: bool = Field(False, description="the baseline: the checkpoint's model with freshly "
                                                    "initialised weights (seeded by `seed`) instead of its own")


class RetrievalConfig(Strict):
    ks: list[int] = Field([1, 5, 10], min_length=1, description="recall@k is reported for each k")
    knn_k: int = Field(20, gt=0, description="neighbours voting in each modality's k-NN")
    knn_temperature: float = Field(0.07, gt=0, description="k-NN votes are weighted exp(cosine similarity / T)")

    @field_validator("ks")
    @classmethod
    def _positive(cls, ks: list[int]) -> list[int]:
        if min(ks) <= 0:
            raise ValueError(f"every k must be positive, got {ks}")
        return sorted(set(ks))


class RetrievalRecipe(Strict):
    task: Literal["retrieval"] = Field(description="cross-modal retrieval + per-modality k-NN, no training")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="run directory name")
    seed: Seed = Field(0, description="seeds the random-weights baseline (init.random_weights)")
    plugins: list[str] = Field(default_factory=list, description="extra plugin modules to import by name")
    init: RetrievalInit = Field(description="the joint checkpoint to evaluate")
    data: DownstreamDataConfig = Field(description="a paired dataset: train = the k-NN bank (read without "
                                                   "augmentation), eval = the held-out pairs (retrieval queries)")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _runtime_fits_the_task(self) -> RetrievalRecipe:
        if self.runtime.strategy != "ddp":
            raise ValueError("runtime.strategy: a retrieval run keeps its frozen encoder whole on every process "
                             "(ddp)")
        unused = [name for name in UNUSED_RUNTIME_FIELDS["retrieval"]
                  if getattr(self.runtime, name) != RuntimeConfig.model_fields[name].default]
        if unused:
            raise ValueError(f"runtime.{unused[0]}: a retrieval run {UNUSED_REASON['retrieval']}; leave "
                             f"{', '.join('runtime.' + n for n in unused)} at the default")
        return self
