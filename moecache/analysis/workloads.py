"""Multimodal prompt workloads: how many tokens an image becomes in DeepSeek-VL2 and in LLaVA-style
models (LLaVA-1.5, MoE-LLaVA), and prompt mixes shaped like MMMU, MathVista and text-only questions.

DeepSeek-VL2 tiles each image dynamically: among grids of m x n tiles of 384 px with m * n <= 9, it picks
the grid whose resolution keeps the most of the image (effective resolution after fitting the image
inside it), then the least waste; only prompts with at most two images are tiled (more images get one
tile each). Each image then costs a global 384 px view of 14 x 14 tokens with a newline token per row
(14 x 15), one separator, and the local grid of n_h x n_w tiles with a newline per row:
    visual tokens = 211 + 14 * n_h * (14 * n_w + 1).

LLaVA-1.5 and MoE-LLaVA pad each image to a square and resize it to 336 px for CLIP ViT-L/14-336
(MoE-LLaVA's scripts: `--image_tower clip-vit-large-patch14-336 --image_aspect_ratio pad
--mm_vision_select_layer -2`), whose 24 x 24 patch features, through the 2-layer MLP projector, are
the image's tokens: 576 per image whatever its size, one block per image in a multi-image prompt.

Prompt-length mixes (`MIXES`) are assumptions, stated here because no dataset is read at run time:
MMMU-like: one image per prompt, mostly scanned pages, slides, charts and diagrams of roughly
600-1600 px on the long side, ~60-200 question text tokens. Some MMMU questions hold several images
(the dataset has fields image_1 .. image_7); for DeepSeek-VL2 prompts 15% have two (tiled), for LLaVA
prompts 7% have 2 to 7 (fewer more often: weights 6:5:4:3:2:1), the share of multi-image questions the
MMMU paper reports being about 7%. MathVista-like: one smaller figure (plots, geometry, tables;
300-900 px), ~40-120 text tokens; text-only: 100-600 tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

TILE = 384
MAX_TILES = 9
LLAVA_IMAGE_TOKENS = 576  # (336 / 14) ** 2 CLIP ViT-L/14 patches
LLAVA_MAX_IMAGES = 7
ENCODERS = ("deepseek-vl2", "llava")


def candidate_grids(max_tiles: int = MAX_TILES) -> list[tuple[int, int]]:
    """(n_w, n_h) grids with n_w * n_h <= max_tiles."""
    return [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]


def best_grid(width: int, height: int, max_tiles: int = MAX_TILES, tile: int = TILE) -> tuple[int, int]:
    """The (n_w, n_h) grid an image of width x height is tiled into: most effective resolution (the image
    scaled to fit the grid, never upscaled beyond its own pixels), then least wasted grid area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    if max_tiles < 1 or tile < 1:
        raise ValueError(f"max_tiles and tile must be >= 1, got {max_tiles} and {tile}")
    best, best_key = None, None
    for n_w, n_h in candidate_grids(max_tiles):
        grid_w, grid_h = n_w * tile, n_h * tile
        scale = min(grid_w / width, grid_h / height)
        fitted = int(width * scale) * int(height * scale)
        effective = min(fitted, width * height)
        waste = grid_w * grid_h - effective
        key = (effective, -waste)
        if best_key is None or key > best_key:
            best, best_key = (n_w, n_h), key
    return best


def visual_tokens(n_w: int, n_h: int) -> int:
    """Tokens of one image tiled n_w x n_h: the global view (14 x 15 + 1) and the local grid."""
    if n_w < 1 or n_h < 1:
        raise ValueError(f"a tile grid is at least 1 x 1, got {n_w} x {n_h}")
    return 211 + 14 * n_h * (14 * n_w + 1)


def image_tokens(sizes: list[tuple[int, int]]) -> int:
    """Visual tokens of a prompt's images: tiled when there are at most two images, one tile each otherwise."""
    if len(sizes) > 2:
        return len(sizes) * visual_tokens(1, 1)
    return sum(visual_tokens(*best_grid(w, h)) for w, h in sizes)


@dataclass(frozen=True)
class Prompt:
    """A prompt's text tokens and image sizes (width, height); `encoder` says how images become tokens."""

    text_tokens: int
    images: tuple[tuple[int, int], ...] = ()
    encoder: str = "deepseek-vl2"

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.text_tokens < 0:
            raise ValueError(f"text_tokens must be >= 0, got {self.text_tokens}")

    @property
    def image_tokens(self) -> int:
        if self.encoder == "llava":
            return LLAVA_IMAGE_TOKENS * len(self.images)
        return image_tokens(list(self.images))

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    @property
    def encoder_inputs(self) -> int:
        """Images (LLaVA) or tiles (DeepSeek-VL2: each image's global view and its local grid) the vision
        encoder runs on."""
        if self.encoder == "llava":
            return len(self.images)
        if len(self.images) > 2:
            return 2 * len(self.images)
        return sum(1 + n_w * n_h for n_w, n_h in (best_grid(w, h) for w, h in self.images))


def _page(rng: random.Random) -> tuple[int, int]:
    long_side = rng.randint(600, 1600)
    aspect = rng.uniform(0.5, 1.0)
    return (long_side, int(long_side * aspect)) if rng.random() < 0.7 else (int(long_side * aspect), long_side)


def _mmmu(rng: random.Random, encoder: str) -> Prompt:
    if encoder == "llava":
        images = 1 if rng.random() < 0.93 else rng.choices(range(2, LLAVA_MAX_IMAGES + 1), weights=range(6, 0, -1))[0]
    else:
        images = 1 if rng.random() < 0.85 else 2
    sizes = [_page(rng) for _ in range(images)]
    return Prompt(rng.randint(60, 200), tuple(sizes), encoder)


def _mathvista(rng: random.Random, encoder: str) -> Prompt:
    long_side = rng.randint(300, 900)
    aspect = rng.uniform(0.5, 1.0)
    return Prompt(rng.randint(40, 120), ((long_side, int(long_side * aspect)),), encoder)


def _text(rng: random.Random, encoder: str) -> Prompt:
    return Prompt(rng.randint(100, 600), (), encoder)


MIXES = {"mmmu": _mmmu, "mathvista": _mathvista, "text": _text}


def sample_prompts(mix: str, n: int, seed: int = 0, encoder: str = "deepseek-vl2") -> list[Prompt]:
    """n prompts of a mix ("mmmu", "mathvista", "text") for a model's image encoder ("deepseek-vl2",
    "llava"), deterministic for a seed."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}, got {mix!r}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [MIXES[mix](rng, encoder) for _ in range(n)]
