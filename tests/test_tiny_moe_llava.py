"""The tiny MoE-LLaVA-style model shipped in moecache/data/tiny_moe_llava (trained by
`bench/train_tiny_moe.py --family moe-llava`).

It must load offline through the local MoE-LLaVA checkpoint loader, stay small, predict held-out
bytes far better than chance, route as trained (balanced, with temporal locality well above what
independent tokens would show), and give the same greedy tokens patched, resident or offloaded.
DeepSpeed's top-2 gate samples the second expert with Gumbel noise from the global generator (in
eval too), so every run that compares outputs seeds it first. Bounds sit just past the values
measured at training time (TRAINING.md).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moecache  # noqa: E402
from moecache.data import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TINY_MOE_DIR,
    TINY_MOE_LLAVA_DIR,
    decode,
    encode,
    load_tiny_moe_llava,
    validation_text,
)
from moecache.testing import greedy  # noqa: E402

MAX_TOTAL_BYTES = 3_000_000
SEQ_LEN = 256
BATCH = 4  # windows per forward: the routing group whose capacity DeepSpeed counts, as TRAINING.md measured
SEED = 0
# Held-out bits/byte measured with the shipped fp16 weights (TRAINING.md): 2.1714 (uniform: 8; random init 8.066).
MEASURED_BPB = 2.1714
MAX_BITS_PER_BYTE = 2.20
# Per MoE layer, from the two largest router scores per token (TRAINING.md's "top2" table): no expert
# starved or hogging (measured shares: layer 0 0.163-0.381, layer 2 0.235-0.276; random init layer 2:
# 0.177-0.363), and consecutive tokens share their expert pair more often than independent tokens with
# the same pair frequencies would (measured same pair - chance: layer 0 0.364 - 0.226, layer 2 0.249 - 0.179).
SHARE_BOUNDS = {0: (0.14, 0.41), 2: (0.21, 0.30)}
MIN_SAME_PAIR_OVER_CHANCE = {0: 0.11, 2: 0.05}


def seeded(fn, *args, **kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return fn(*args, **kwargs)


def _moe_layers(model):
    return {i: layer.mlp.deepspeed_moe for i, layer in enumerate(model.model.layers)
            if hasattr(layer.mlp, "deepspeed_moe")}


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(one_thread):
    return load_tiny_moe_llava()


@pytest.fixture(scope="module")
def heldout_run(model):
    """One seeded pass over the held-out sample in batches of BATCH windows: logits and gate inputs."""
    ids = encode(validation_text())[0]
    n = ids.numel() // SEQ_LEN
    windows = ids[: n * SEQ_LEN].view(n, SEQ_LEN)
    gate_in = {i: [] for i in _moe_layers(model)}
    handles = [moe.gate.register_forward_hook(lambda m, args, out, i=i: gate_in[i].append(args[0]))
               for i, moe in _moe_layers(model).items()]

    def run():
        with torch.no_grad():
            return torch.cat([model(windows[s:s + BATCH], use_cache=False).logits for s in range(0, n, BATCH)])

    try:
        logits = seeded(run)
    finally:
        for h in handles:
            h.remove()
    return {"windows": windows, "logits": logits, "gate_in": {i: torch.cat(v) for i, v in gate_in.items()}}


def test_shipped_files_small_and_heldout_not_duplicated():
    names = {p.name for p in TINY_MOE_LLAVA_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "TRAINING.md"} <= names
    assert "heldout.txt" not in names and (TINY_MOE_DIR / "heldout.txt").is_file()  # shared with tiny_moe
    total = sum(p.stat().st_size for p in TINY_MOE_LLAVA_DIR.iterdir() if p.is_file())
    assert total <= MAX_TOTAL_BYTES, f"tiny_moe_llava ships {total} bytes"
    from safetensors import safe_open

    with safe_open(str(TINY_MOE_LLAVA_DIR / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_config_is_a_moe_llava_checkpoint_config():
    cfg = json.loads((TINY_MOE_LLAVA_DIR / "config.json").read_text())
    assert cfg["model_type"] == "moe_llava_stablelm"
    moe = cfg["moe"]
    assert moe["moe_enable"] and moe["moe_mode"] == "sparse" and moe["moe_layers_idx"] == [0, 2]
    assert moe["num_experts"] == [4, 4] and moe["top_k_experts"] == 2 and moe["router_aux_loss_coef"] == 0.01
    assert (moe["capacity_factor"], moe["eval_capacity_factor"], moe["min_capacity"]) == (1.5, 1.0, 4)
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["intermediate_size"], cfg["max_position_embeddings"]) == (259, 128, 4, 4, 256, 512)


def test_loads_offline_in_eval_mode_with_the_configs_routing(model):
    from moecache.models.deepspeed_moe import MoE

    assert isinstance(model, transformers.StableLmForCausalLM) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    layers = _moe_layers(model)
    assert sorted(layers) == [0, 2]
    assert all(isinstance(model.model.layers[i].mlp, MoE) for i in layers)
    assert not any(hasattr(model.model.layers[i].mlp, "deepspeed_moe") for i in (1, 3))
    for moe in layers.values():
        gate = moe.gate
        assert (gate.k, gate.wg.out_features, len(moe.experts.deepspeed_experts)) == (2, 4, 4)
        assert (gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity) == (1.5, 1.0, 4)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (BOS_ID, EOS_ID,
                                                                                                 PAD_ID)
    assert model.generation_config.eos_token_id == EOS_ID


def test_heldout_bits_per_byte(heldout_run):
    logits, targets = heldout_run["logits"][:, :-1], heldout_run["windows"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    bpb = nll.item() / torch.log(torch.tensor(2.0)).item()
    assert bpb < MAX_BITS_PER_BYTE, f"held-out {bpb:.4f} bits/byte (measured at training: {MEASURED_BPB}; uniform: 8)"


def test_routing_is_trained_balanced_and_temporally_local(model, heldout_run):
    n_win = heldout_run["windows"].shape[0]
    for i, moe in _moe_layers(model).items():
        scores = heldout_run["gate_in"][i].float() @ moe.gate.wg.weight.float().t()
        pair = scores.topk(2, dim=-1).indices.sort(-1).values  # [S, 2]
        shares = torch.bincount(pair.reshape(-1), minlength=4).float() / pair.numel()
        low, high = SHARE_BOUNDS[i]
        assert low <= shares.min() and shares.max() <= high, f"layer {i}: expert shares {shares.tolist()}"
        pair_id = (pair[:, 0] * 4 + pair[:, 1]).view(n_win, SEQ_LEN)
        same = (pair_id[:, 1:] == pair_id[:, :-1]).float().mean().item()
        freq = torch.bincount(pair_id.reshape(-1), minlength=16).float() / pair_id.numel()
        chance = (freq ** 2).sum().item()
        assert same >= chance + MIN_SAME_PAIR_OVER_CHANCE[i], f"layer {i}: same pair {same:.3f}, chance {chance:.3f}"


def test_greedy_generation_deterministic_when_seeded(model):
    prompt = encode("import os\n\n\ndef ")
    runs = [seeded(greedy, model, prompt, n=32) for _ in range(2)]
    assert runs[0].shape == (1, prompt.shape[1] + 32)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0][:, : prompt.shape[1]], prompt)
    assert isinstance(decode(runs[0]), str)


@pytest.mark.parametrize("offload", [None, moecache.Offload(gpu_experts=0.5, policy="lru")],
                         ids=["resident", "offload50-lru"])
def test_patched_gives_the_same_greedy_tokens(one_thread, offload):
    model = load_tiny_moe_llava()
    prompt = encode("class Reader:\n    def __init__(self", bos=True)
    ref = seeded(greedy, model, prompt, n=24)
    moecache.patch(model, offload=offload)
    try:
        assert len(moecache.stats(model)["layers"]) == 2
        assert torch.equal(seeded(greedy, model, prompt, n=24), ref)
        if offload is not None:
            assert moecache.stats(model)["cache"]["misses"] > 0
    finally:
        moecache.unpatch(model)
    assert torch.equal(seeded(greedy, model, prompt, n=24), ref)


def test_a_checkpoint_unlike_its_family_is_refused_by_name(tmp_path):
    """Regression: the architecture came from the family alone, so a config.json asking for another rope
    base or norm, or a checkpoint with experts the config does not count, loaded without a word (extra
    weights dropped, the model computing something else than what was saved)."""
    import json
    import shutil

    from moecache.models.llava import load_language_model

    def variant(name, **changes):
        where = tmp_path / name
        shutil.copytree(TINY_MOE_LLAVA_DIR, where)
        cfg = json.loads((where / "config.json").read_text())
        for key, value in changes.items():
            if key == "num_experts":
                cfg["moe"]["num_experts"] = value
            else:
                cfg[key] = value
        (where / "config.json").write_text(json.dumps(cfg))
        return where

    load_language_model(variant("same"))  # the shipped checkpoint itself loads
    from safetensors.torch import load_file, save_file

    older = variant("older-transformers")  # which saved rotary_emb.inv_freq buffers with the weights
    weights = load_file(str(older / "model.safetensors"))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(weights, str(older / "model.safetensors"))
    load_language_model(older)
    for key, value in (("rope_theta", 500000.0), ("layer_norm_eps", 1e-3), ("hidden_act", "gelu"),
                       ("use_parallel_residual", True), ("num_key_value_heads", 2)):
        with pytest.raises(ValueError, match=f"config.json sets {key}="):
            load_language_model(variant(key, **{key: value}))
    with pytest.raises(ValueError, match="language-model weights in the checkpoint that the model its config"):
        load_language_model(variant("fewer-experts", num_experts=[2, 2]))
