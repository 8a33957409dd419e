"""One optimizer step of joint pretraining: each modality's flow (tokenize -> mask -> target -> its losses) around
one `JointMaskedAutoencoder` forward over the modalities of the batch, plus the cross-modal losses."""
from __future__ import annotations

from torch import Tensor

from ..build import Prepared
from ..errors import MaeframeError
from ..masker import Mask
from ..model.joint import JointMaskedAutoencoder
from ..tokenizer import Tokens
from .distributed import World
from .optim import build_optimizer
from .runtime import Runtime
from .step import OptimizerStep, mae_losses


class JointMAEStep(OptimizerStep):
    """`inputs` of a micro-batch are {modality: [B, *input_shape]}: one modality under alternate mixing (the
    step's draw), all of them under paired mixing. Loss terms are logged as loss/<modality>/<label> and
    loss/joint/<label>; the total is their weighted sum."""

    def __init__(self, prepared: Prepared, runtime: Runtime, world: World, lr: float, steps_per_epoch: int):
        recipe = prepared.recipe
        self.prepared, self.modalities, self.joint_losses = prepared, prepared.modalities, prepared.joint_losses
        self.paired = recipe.mixing == "paired"
        # alternate mixing leaves the other modalities' own parameters without gradients in a step
        self.find_unused_parameters = not self.paired
        model = JointMaskedAutoencoder({name: c.tokenizer.spec for name, c in self.modalities.items()},
                                       {name: c.target.out_dim for name, c in self.modalities.items()},
                                       recipe.model, typed=self.paired)
        super().__init__(model, prepared, runtime, world, lr, steps_per_epoch,
                         lambda module: build_optimizer(module, recipe.optim, lr, runtime.device))
        for _, component in prepared.all_components():
            component.attach(self.model)

    def begin(self, step: int) -> None:
        for _, component in self.prepared.all_components():
            component.set_progress(step, step / self.steps_per_epoch)

    def draw_masks(self, names: list[str], batch_size: int) -> dict[str, Mask]:
        """Masks of this process's slice of the global batch for each modality in `names` (recipe order), each
        drawn for the whole global batch as `MAEStep.draw_mask` does."""
        start = self.world.rank * batch_size
        return {name: self.modalities[name].masker(batch_size * self.world.world_size, self.device).rows(
            start, start + batch_size) for name in names}

    def _names(self, inputs: dict[str, Tensor]) -> list[str]:
        names = [name for name in self.modalities if name in inputs]
        if len(names) != len(inputs) or (self.paired and len(names) != len(self.modalities)):
            raise MaeframeError(f"data.train: a batch holds modalities {sorted(inputs)}, the recipe has "
                                f"{list(self.modalities)}" + (" (paired mixing: every sample holds all of them)"
                                                              if self.paired else ""))
        return names

    def predict(self, inputs: dict[str, Tensor], masks: dict[str, Mask] | None = None, step: int = 0, model=None,
                micro: int = 0):
        """inputs {m: [B, *input_shape_m]} on device -> ({m: Tokens}, {m: Mask}, {m: Prediction}). `model`
        overrides the (wrapped, compiled) training model, e.g. the plain model for pictures."""
        names = self._names(inputs)
        tokens: dict[str, Tokens] = {name: self.modalities[name].tokenizer.tokenize(inputs[name]) for name in names}
        if masks is None:
            masks = self.draw_masks(names, next(iter(inputs.values())).shape[0])
        with self.model_rng(step, micro), self.runtime.autocast():
            predictions = (model or self.step_model)({name: tokens[name].patches for name in names},
                                                     {name: masks[name] for name in names})
        return tokens, masks, predictions

    def forward_losses(self, inputs: dict[str, Tensor], masks: dict[str, Mask] | None = None, step: int = 0,
                       micro: int = 0):
        """-> (total loss, {"<modality>/<label>" and "joint/<label>": term}, tokens, masks, predictions)."""
        tokens, masks, predictions = self.predict(inputs, masks, step, micro=micro)
        terms: dict[str, Tensor] = {}
        total: Tensor | float = 0.0
        for name in tokens:
            flow_total, flow_terms, _ = mae_losses(self.modalities[name], tokens[name], masks[name],
                                                   predictions[name], self.runtime.autocast)
            terms.update({f"{name}/{label}": term for label, term in flow_terms.items()})
            total = total + flow_total
        for label, weight, loss in self.joint_losses:
            terms[f"joint/{label}"] = term = loss(predictions, masks)
            total = total + weight * term
        return total, terms, tokens, masks, predictions

    def losses(self, inputs: dict[str, Tensor], labels: Tensor, step: int, micro: int):
        total, terms, *_ = self.forward_losses(inputs, step=step, micro=micro)
        return total, terms
