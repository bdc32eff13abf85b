"""The study's image encoders: their token counts agree with the workloads' prompt arithmetic."""
import pytest
import torch

from moecache.analysis.workloads import LLAVA_IMAGE_TOKENS, Prompt, visual_tokens
from moecache.models.vision import VISION, build_vision_tower, scaled_down_vision

pytest.importorskip("transformers")


def test_full_size_encoders_emit_the_tokens_the_workloads_count():
    assert VISION["llava"].tokens == LLAVA_IMAGE_TOKENS
    # A VL2 image tiled 1 x 1: its global view and one local tile, 14 x 14 tokens each, plus the
    # newline per row and the separator the language model adds as embeddings.
    assert visual_tokens(1, 1) == 2 * VISION["deepseek-vl2"].tokens + 2 * 14 + 1


def test_encoder_inputs_count_images_and_tiles():
    assert Prompt(10, ((800, 600), (300, 300)), "llava").encoder_inputs == 2
    assert Prompt(10, ((384, 384),)).encoder_inputs == 2  # global view + one tile
    assert Prompt(10, ((768, 384),)).encoder_inputs == 3  # global view + a 2 x 1 grid
    assert Prompt(10, ((768, 384),) * 3).encoder_inputs == 6  # more than two images: one tile each
    assert Prompt(10).encoder_inputs == 0


@pytest.mark.parametrize("encoder", ["llava", "deepseek-vl2"])
def test_scaled_tower_maps_images_to_language_model_tokens(encoder):
    shape = scaled_down_vision(VISION[encoder])
    tower = build_vision_tower(encoder, 48, scaled=True)
    images = torch.randn(3, 3, shape.image, shape.image)
    with torch.no_grad():
        tokens = tower(images)
        again = tower(images[1:2])
    assert tokens.shape == (3, shape.tokens, 48) and torch.isfinite(tokens).all()
    assert torch.allclose(again[0], tokens[1], atol=1e-5)  # images are encoded independently
    assert not torch.allclose(tokens[0], tokens[1])
    with torch.no_grad():
        assert tower(images[:0]).shape == (0, shape.tokens, 48)  # no images in the batch: no image tokens
    with pytest.raises(ValueError, match=f"images must be \\[N, 3, {shape.image}, {shape.image}\\]"):
        tower(images[:, :, 1:])


def test_unknown_encoder_is_refused_by_name():
    with pytest.raises(ValueError, match="encoder must be one of"):
        build_vision_tower("vit", 16, scaled=True)
