"""The recipe's building blocks shared by the pretraining schema (`recipe.py`) and its joint-modality part
(`recipe_joint.py`): strict models, component references and the seed range."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


# torch.manual_seed and torch.Generator.manual_seed accept [-2**63, 2**64 - 1] (negative seeds are remapped)
SEED_RANGE = (-2**63, 2**64 - 1)
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentRef(Strict):
    name: str = Field(description="registered component name; `maeframe plugins` lists them")
    options: dict[str, Any] = Field(default_factory=dict, description="the component's own options")


class LossRef(ComponentRef):
    weight: float = Field(1.0, ge=0, description="multiplier of this term in the total loss")
