"""The image encoders in front of the study's language models, with random weights (timed, not trained):
an image (or tile) in, the language model's image tokens out.

- "llava" (LLaVA-1.5, MoE-LLaVA): CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, MLP 4096);
  the penultimate layer's 24 x 24 patch features (CLS dropped) through the 2-layer GELU MLP projector
  ("mlp2x_gelu") to the language model's width: 576 tokens per image.
- "deepseek-vl2": SigLIP-SO400M at 384 px (hidden 1152, 27 layers, 16 heads, MLP 4304), per 384 px
  tile; its 27 x 27 patch features padded to 28 x 28 and merged 2 x 2 (4 x 1152 channels) through a
  2-layer GELU MLP to the language model's width: 14 x 14 tokens per tile (the newline and separator
  tokens DeepSeek-VL2 adds are embeddings, not encoder work).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionShape:
    kind: str  # "clip" or "siglip"
    image: int
    patch: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    merge: int  # patch features merged merge x merge into one token

    @property
    def tokens(self) -> int:
        side = self.image // self.patch
        side = -(-side // self.merge)
        return side * side


VISION = {
    "llava": VisionShape("clip", 336, 14, 1024, 24, 16, 4096, 1),
    "deepseek-vl2": VisionShape("siglip", 384, 14, 1152, 27, 16, 4304, 2),
}


def scaled_down_vision(shape: VisionShape) -> VisionShape:
    return VisionShape(shape.kind, 4 * shape.patch, shape.patch, 32, 2, 2, 64, shape.merge)


class VisionTower(nn.Module):
    """Encoder + projector: images [N, 3, S, S] -> image tokens [N, tokens, lm_hidden]."""

    def __init__(self, shape: VisionShape, lm_hidden: int):
        super().__init__()
        import transformers

        self.shape = shape
        if shape.kind == "clip":
            config = transformers.CLIPVisionConfig(hidden_size=shape.hidden, intermediate_size=shape.mlp,
                                                   num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                                   image_size=shape.image, patch_size=shape.patch,
                                                   hidden_act="quick_gelu")
            self.encoder = transformers.CLIPVisionModel(config)
        else:
            config = transformers.SiglipVisionConfig(hidden_size=shape.hidden, intermediate_size=shape.mlp,
                                                     num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                                     image_size=shape.image, patch_size=shape.patch)
            self.encoder = transformers.SiglipVisionModel(config)
        width = shape.hidden * shape.merge * shape.merge
        self.projector = nn.Sequential(nn.Linear(width, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.shape.image
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be [N, 3, {size}, {size}], got {tuple(images.shape)}")
        if images.shape[0] == 0:  # a batch of text-only prompts: no image tokens (the encoders cannot take 0)
            lm_hidden = self.projector[-1].out_features
            return images.new_empty(0, self.shape.tokens, lm_hidden, dtype=self.projector[-1].weight.dtype)
        out = self.encoder(pixel_values=images, output_hidden_states=True)
        if self.shape.kind == "clip":
            features = out.hidden_states[-2][:, 1:]  # penultimate layer, CLS dropped
        else:
            features = out.last_hidden_state
        n, p, c = features.shape
        side = int(p ** 0.5)
        if self.shape.merge > 1:
            m = self.shape.merge
            grid = features.reshape(n, side, side, c).permute(0, 3, 1, 2)
            pad = (-side) % m
            grid = F.pad(grid, (0, pad, 0, pad))
            features = F.pixel_unshuffle(grid, m).flatten(2).transpose(1, 2)  # [n, tokens, c * m * m]
        return self.projector(features)


def build_vision_tower(encoder: str, lm_hidden: int, *, scaled: bool = False, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", seed: int = 0) -> VisionTower:
    """The image encoder of a model family ("llava" or "deepseek-vl2") with random weights."""
    if encoder not in VISION:
        raise ValueError(f"encoder must be one of {sorted(VISION)}, got {encoder!r}")
    shape = scaled_down_vision(VISION[encoder]) if scaled else VISION[encoder]
    torch.manual_seed(seed)
    with torch.device(device):
        tower = VisionTower(shape, lm_hidden)
    return tower.to(dtype).eval()
