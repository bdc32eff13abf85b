"""Multimodal prompt workloads shaped like DeepSeek-VL2's: how many tokens an image becomes.

DeepSeek-VL2 tiles each image dynamically: among grids of m x n tiles of 384 px with m * n <= 9, it picks
the grid whose resolution keeps the most of the image (effective resolution after fitting the image
inside it), then the least waste; only prompts with at most two images are tiled (more images get one
tile each). Each image then costs a global 384 px view of 14 x 14 tokens with a newline token per row
(14 x 15), one separator, and the local grid of n_h x n_w tiles with a newline per row:
    visual tokens = 211 + 14 * n_h * (14 * n_w + 1).

Prompt-length mixes (`MIXES`) are assumptions, stated here because no dataset is read at run time:
MMMU-like: one image per prompt (a few with two), mostly scanned pages, slides, charts and diagrams of
roughly 600-1600 px on the long side, ~60-200 question text tokens; MathVista-like: one smaller figure
(plots, geometry, tables; 300-900 px), ~40-120 text tokens; text-only: 100-600 tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

TILE = 384
MAX_TILES = 9


def candidate_grids(max_tiles: int = MAX_TILES) -> list[tuple[int, int]]:
    """(n_w, n_h) grids with n_w * n_h <= max_tiles."""
    return [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]


def best_grid(width: int, height: int, max_tiles: int = MAX_TILES, tile: int = TILE) -> tuple[int, int]:
    """The (n_w, n_h) grid an image of width x height is tiled into: most effective resolution (the image
    scaled to fit the grid, never upscaled beyond its own pixels), then least wasted grid area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
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
    return 211 + 14 * n_h * (14 * n_w + 1)


def image_tokens(sizes: list[tuple[int, int]]) -> int:
    """Visual tokens of a prompt's images: tiled when there are at most two images, one tile each otherwise."""
    if len(sizes) > 2:
        return len(sizes) * visual_tokens(1, 1)
    return sum(visual_tokens(*best_grid(w, h)) for w, h in sizes)


@dataclass(frozen=True)
class Prompt:
    text_tokens: int
    images: tuple[tuple[int, int], ...] = ()

    @property
    def tokens(self) -> int:
        return self.text_tokens + image_tokens(list(self.images))


def _mmmu(rng: random.Random) -> Prompt:
    images = 1 if rng.random() < 0.85 else 2
    sizes = []
    for _ in range(images):
        long_side = rng.randint(600, 1600)
        aspect = rng.uniform(0.5, 1.0)
        sizes.append((long_side, int(long_side * aspect)) if rng.random() < 0.7 else (int(long_side * aspect), long_side))
    return Prompt(rng.randint(60, 200), tuple(sizes))


def _mathvista(rng: random.Random) -> Prompt:
    long_side = rng.randint(300, 900)
    aspect = rng.uniform(0.5, 1.0)
    return Prompt(rng.randint(40, 120), ((long_side, int(long_side * aspect)),))


def _text(rng: random.Random) -> Prompt:
    return Prompt(rng.randint(100, 600))


MIXES = {"mmmu": _mmmu, "mathvista": _mathvista, "text": _text}


def sample_prompts(mix: str, n: int, seed: int = 0) -> list[Prompt]:
    """n prompts of a mix ("mmmu", "mathvista", "text"), deterministic for a seed."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}, got {mix!r}")
    rng = random.Random(seed)
    return [MIXES[mix](rng) for _ in range(n)]
