"""A tiny DeepSeek-V2-style MoE language model trained by this project, shipped with the package.

Random-weight models route without structure, so expert prediction and caching cannot be judged on
them. This model (byte-level, 4 decoder layers: 1 dense + 3 MoE with 32 routed experts, top-4, one
shared expert, MLA attention; ~2.75M parameters, fp16 on disk) was trained on Python standard
library sources by `bench/train_tiny_moe.py`; `tiny_moe/TRAINING.md` records how and what it reached.

Example::

    >>> from moecache.data import load_tiny_moe, encode, decode, validation_text
    >>> model = load_tiny_moe()                       # eval mode, fp32, CPU, no network
    >>> ids = encode("def main():\\n")                # LongTensor [1, n] of byte values
    >>> out = model.generate(ids, max_new_tokens=40, do_sample=False)
    >>> print(decode(out[0]))
    >>> held_out = validation_text()                  # ~32 KB of held-out stdlib source

A second model, `load_tiny_moe_llava()`, is MoE-LLaVA-style (StableLM base, DeepSpeed-MoE with 4 experts,
top-2, on layers 0 and 2; ~1.3M parameters), trained on the same data by `bench/train_tiny_moe.py
--family moe-llava`; `tiny_moe_llava/TRAINING.md` records how. Its files are a MoE-LLaVA checkpoint
directory, loaded by `moecache.models.llava.load_language_model`.

Vocabulary (both models): ids 0..255 are bytes; BOS_ID = 256 starts a file, EOS_ID = 257 ends it, PAD_ID = 258.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "TINY_MOE_DIR", "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE",
    "load_tiny_moe", "encode", "decode", "validation_text",
    "TINY_MOE_LLAVA_DIR", "load_tiny_moe_llava",
]

TINY_MOE_DIR = Path(__file__).resolve().parent / "tiny_moe"
TINY_MOE_LLAVA_DIR = Path(__file__).resolve().parent / "tiny_moe_llava"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def load_tiny_moe(device="cpu", dtype=torch.float32):
    """The shipped tiny MoE model (`transformers.DeepseekV2ForCausalLM`), in eval mode.

    Loads from the package directory only (`local_files_only=True`): never touches the network.
    Weights are stored in fp16 and cast to `dtype`.
    """
    from transformers import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(str(TINY_MOE_DIR), local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def load_tiny_moe_llava(device="cpu", dtype=torch.float32):
    """The shipped tiny MoE-LLaVA-style model (`transformers.StableLmForCausalLM` with DeepSpeed-MoE
    layers, `moecache.models.deepspeed_moe.MoE`, on decoder layers 0 and 2: 4 experts, top-2), in eval mode.

    Loaded from the package directory by `moecache.models.llava.load_language_model` (a MoE-LLaVA
    checkpoint directory: config.json with a "moe" section, fp16 safetensors): never touches the
    network. Weights are cast to `dtype`. Eval uses the config's eval_capacity_factor (1.0) and
    min_capacity (4). As in DeepSpeed, the top-2 gate draws the second expert with Gumbel noise from
    torch's global generator, in eval too: seed it (`torch.manual_seed`) for repeatable outputs.
    Held-out text: `validation_text()` (the same split as `load_tiny_moe`'s).
    """
    from ..models.llava import load_language_model

    return load_language_model(TINY_MOE_LLAVA_DIR, dtype=dtype, device=device).eval()


def encode(text: str, *, bos: bool = False) -> torch.Tensor:
    """UTF-8 bytes of `text` as token ids: LongTensor [1, n] (n + 1 with `bos`)."""
    data = text.encode("utf-8")
    ids = torch.tensor(list(data), dtype=torch.long)
    if bos:
        ids = torch.cat([torch.tensor([BOS_ID], dtype=torch.long), ids])
    return ids.unsqueeze(0)


def decode(ids) -> str:
    """Text of token ids (a tensor of any shape, or a list); special ids (>= 256) are dropped."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def validation_text() -> str:
    """Held-out text (whole files from the validation split, never trained on), ~32 KB."""
    return (TINY_MOE_DIR / "heldout.txt").read_text(encoding="utf-8")
