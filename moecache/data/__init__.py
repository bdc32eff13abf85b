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

Vocabulary: ids 0..255 are bytes; BOS_ID = 256 starts a file, EOS_ID = 257 ends it, PAD_ID = 258.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "TINY_MOE_DIR", "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE",
    "load_tiny_moe", "encode", "decode", "validation_text", "routing_trace",
]

TINY_MOE_DIR = Path(__file__).resolve().parent / "tiny_moe"
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


@torch.no_grad()
def routing_trace(model, ids: torch.Tensor, *, seq_len: int = 256, batch_size: int = 16) -> dict:
    """What each MoE layer saw and chose, for predictor and caching experiments.

    ids: LongTensor [1, n] (or [n]); it is cut into non-overlapping windows of `seq_len` tokens (a
    shorter last window is dropped) run independently, `batch_size` windows at a time.

    Returns {decoder layer index: {"hidden": [N, H] fp32}} for every decoder layer: the input of its MLP
    block (after post_attention_layernorm; for a MoE layer, what its router and experts read). MoE
    layers also carry "topk_ids" [N, K] int64 (the experts chosen) and "router_logits" [N, E] fp32.
    N = windows * seq_len, tokens in order.
    """
    ids = ids.reshape(-1)
    n_win = ids.numel() // seq_len
    if n_win == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {ids.numel()}")
    windows = ids[: n_win * seq_len].view(n_win, seq_len).to(next(model.parameters()).device)
    layers = model.model.layers
    first_moe = model.config.first_k_dense_replace
    acc: dict = {i: {"hidden": []} for i in range(len(layers))}
    handles = []

    def mlp_hook(m, args, out, i):
        acc[i]["hidden"].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

    def gate_hook(m, args, out, i):
        logits, _, topk = out
        acc[i]["router_logits"].append(logits.float().cpu())
        acc[i]["topk_ids"].append(topk.long().cpu())

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: mlp_hook(m, a, o, i)))
        if i >= first_moe:
            acc[i].update(topk_ids=[], router_logits=[])
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: gate_hook(m, a, o, i)))
    try:
        for start in range(0, n_win, batch_size):
            model(windows[start:start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in acc.items()}
