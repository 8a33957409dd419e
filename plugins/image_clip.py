"""An image as a short clip (OmniMAE): the image is repeated over `tubelet` frames and cut into the same
t×p×q tubelets as video, so images and clips share one patch embedding and one 3-D sin-cos position grid.

[B, C, H, W] -> [B, 1·(H/p)·(W/q), t·p·q·C] with grid (1, H/p, W/q); untokenize averages the t frames back
into one image (exact on what tokenize made). Pictures are drawn as images (the base class's PNG grid).
"""
from __future__ import annotations

from pydantic import Field
from torch import Tensor

from maeframe import Tokenizer, Tokens, TokenSpec, hookimpl

from .image import ImagePatchOptions
from .video import VideoTubeOptions, VideoTubeTokenizer


class ImageClipOptions(ImagePatchOptions):
    """The image patch options (image size, spatial patch, channels) plus the frames an image is repeated to."""

    tubelet: int = Field(2, ge=1, description="frames the image is repeated to: one tubelet of t frames, as the "
                                              "video tokenizer it is mixed with (OmniMAE: 2)")


class ImageClipTokenizer(Tokenizer):
    """Images replicated in time to fill one tubelet: grid (1, H/p, W/q), patch_size (t, p, q)."""

    Options = ImageClipOptions

    def __init__(self, options: ImageClipOptions):
        super().__init__(options)
        clip = VideoTubeOptions(**options.model_dump(), num_frames=options.tubelet)
        self.clip = VideoTubeTokenizer(clip)

    @property
    def spec(self) -> TokenSpec:
        return self.clip.spec

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.options.channels, *self.options.hw)

    def tokenize(self, batch: Tensor) -> Tokens:
        """batch [B, C, H, W] -> Tokens(patches [B, (H/p)·(W/q), t·p·q·C], source=batch)."""
        if tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"image_clip tokenizer expects [B, {', '.join(map(str, self.input_shape))}] "
                             f"(B, C, H, W), got {list(batch.shape)}")
        clip = batch.unsqueeze(2).expand(-1, -1, self.options.tubelet, -1, -1)
        return Tokens(patches=self.clip.tokenize(clip).patches, source=batch)

    def untokenize(self, patches: Tensor) -> Tensor:
        """patches [B, (H/p)·(W/q), t·p·q·C] -> [B, C, H, W]: the mean of the t frames."""
        return self.clip.untokenize(patches).mean(dim=2)


@hookimpl
def register_tokenizers(register):
    register("image_clip", ImageClipTokenizer)
