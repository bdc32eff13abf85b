"""Prompt workloads: DeepSeek-VL2 tiling and visual token counts, LLaVA-style 576 tokens per image."""
import pytest

from moecache.analysis.workloads import (
    LLAVA_IMAGE_TOKENS,
    MIXES,
    Prompt,
    best_grid,
    candidate_grids,
    image_tokens,
    sample_prompts,
    visual_tokens,
)


def test_candidate_grids_are_all_grids_of_at_most_nine_tiles():
    grids = candidate_grids()
    assert len(grids) == len(set(grids)) == sum(1 for w in range(1, 10) for h in range(1, 10) if w * h <= 9)
    assert (3, 3) in grids and (9, 1) in grids and (2, 5) not in grids


@pytest.mark.parametrize("size,grid", [((384, 384), (1, 1)), ((768, 384), (2, 1)), ((384, 1152), (1, 3)),
                                       ((1152, 1152), (3, 3)), ((200, 100), (1, 1)), ((4000, 400), (9, 1))])
def test_best_grid_keeps_the_most_resolution_then_wastes_least(size, grid):
    assert best_grid(*size) == grid


def test_visual_token_formula():
    assert visual_tokens(1, 1) == 211 + 14 * 15 == 421
    assert visual_tokens(2, 1) == 211 + 14 * 29
    assert visual_tokens(3, 3) == 211 + 14 * 3 * 43
    assert image_tokens([(768, 384)]) == visual_tokens(2, 1)
    assert image_tokens([(768, 384), (384, 384)]) == visual_tokens(2, 1) + 421  # two images: both tiled
    assert image_tokens([(1152, 1152)] * 3) == 3 * 421  # more than two: one tile each
    assert Prompt(50, ((768, 384),)).tokens == 50 + visual_tokens(2, 1)
    with pytest.raises(ValueError, match="positive"):
        best_grid(0, 10)
    # Regressions: each of these answered quietly (None, 197 tokens, VL2 tiling for a misspelt encoder, []).
    with pytest.raises(ValueError, match="max_tiles"):
        best_grid(10, 10, max_tiles=0)
    with pytest.raises(ValueError, match="1 x 1"):
        visual_tokens(0, -1)
    with pytest.raises(ValueError, match="encoder must be one of"):
        Prompt(50, ((768, 384),), "llava-1.5")
    with pytest.raises(ValueError, match="n must be >= 0"):
        sample_prompts("mmmu", -3)


def test_mixes_are_deterministic_and_shaped_as_stated():
    for mix in MIXES:
        a, b = sample_prompts(mix, 50, seed=1), sample_prompts(mix, 50, seed=1)
        assert a == b
    mmmu, vista, text = (sample_prompts(m, 200) for m in ("mmmu", "mathvista", "text"))
    assert all(1 <= len(p.images) <= 2 for p in mmmu) and all(len(p.images) == 1 for p in vista)
    assert all(not p.images and 100 <= p.tokens <= 600 for p in text)
    mean = lambda ps: sum(p.tokens for p in ps) / len(ps)  # noqa: E731
    assert mean(mmmu) > mean(vista) > 421  # bigger images tile into more tokens
    with pytest.raises(ValueError, match="mix"):
        sample_prompts("coco", 1)


def test_llava_prompts_cost_576_tokens_per_image_whatever_its_size():
    assert LLAVA_IMAGE_TOKENS == (336 // 14) ** 2
    assert Prompt(30, ((4000, 300), (100, 100)), "llava").tokens == 30 + 2 * 576
    mmmu = sample_prompts("mmmu", 2000, seed=3, encoder="llava")
    counts = [len(p.images) for p in mmmu]
    assert max(counts) == 7 and min(counts) == 1
    assert 0.04 < sum(c > 1 for c in counts) / len(counts) < 0.10  # about 7% multi-image, as stated
    assert all(p.tokens == p.text_tokens + 576 * len(p.images) for p in mmmu)
    vista = sample_prompts("mathvista", 100, encoder="llava")
    assert all(p.tokens == p.text_tokens + 576 for p in vista)
    text = sample_prompts("text", 50, seed=4, encoder="llava")
    assert [p.tokens for p in text] == [p.tokens for p in sample_prompts("text", 50, seed=4)]
    # the DeepSeek-VL2 mixes are unchanged by the encoder argument's default
    assert sample_prompts("mmmu", 20, seed=9) == sample_prompts("mmmu", 20, seed=9, encoder="deepseek-vl2")
    with pytest.raises(ValueError, match="encoder"):
        sample_prompts("mmmu", 1, encoder="clip")
