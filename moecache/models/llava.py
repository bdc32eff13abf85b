"""The language models of MoE-LLaVA and of the dense LLaVA-1.5 baselines, built from transformers config
classes (random weights, no download) at full size or scaled down, or loaded from a local checkpoint.

MoE-LLaVA (PKU-YuanGroup/MoE-LLaVA) turns a LLaVA-1.5-style model's FFN into a DeepSpeed-MoE layer
(`deepspeed.moe.layer.MoE`, here `moecache.models.deepspeed_moe.MoE` unless another class is given)
on every other decoder layer (`moe_layers_idx` = layers[::2], its "sparse" mode), 4 experts, top-2,
each expert a copy of the base FFN. Its decoder layers take the first element of the MoE's
(output, l_aux, exp_counts); transformers' decoder layers expect a tensor, so a forward hook on each
MoE hands them the output (l_aux stays on the MoE's MOELayer, as DeepSpeed leaves it).

Shapes (the base models' published configs):
- MoE-LLaVA-Phi2-2.7B-4e: Phi-2: hidden 2560, 32 layers, 32 heads, FFN fc1 2560 -> 10240, gelu (tanh
  approximation, "gelu_new"), fc2 10240 -> 2560, with biases (not gated); vocab 51200; 2048 positions.
- MoE-LLaVA-StableLM-1.6B-4e: StableLM-2-1.6B: hidden 2048, 24 layers, 32 heads, SwiGLU FFN of 5632
  (gate_proj, up_proj, down_proj); vocab 100352; 4096 positions.
- MoE-LLaVA-Qwen-1.8B-4e: Qwen-1.8B: hidden 2048, 24 layers, 16 heads, SwiGLU FFN of 5504 kept with
  Qwen-1's names (c_proj(w1(x) * silu(w2(x)))); vocab 151936; 8192 positions. transformers ships no
  Qwen-1 class; Qwen2's (same attention with q/k/v biases, RMSNorm, rotary) carries it, which matches
  Qwen-1 below its training length (its log-n attention scaling and dynamic NTK start beyond it).
- LLaVA-1.5-7B / 13B (Vicuna-v1.5 = Llama-2 7B / 13B): hidden 4096 / 5120, 32 / 40 layers, 32 / 40
  heads, SwiGLU FFN of 11008 / 13824; vocab 32000; 4096 positions.

Routing settings: capacity_factor 1.5 (MoE-LLaVA's training scripts); eval_capacity_factor 1.0 and
min_capacity 4 (its config class's defaults), unless a checkpoint's config says otherwise.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import compat
from .deepspeed_moe import MoE


@dataclass(frozen=True)
class LanguageModelShape:
    """A language model's shape: `base` names the transformers class family ("phi", "stablelm", "qwen",
    "llama"); num_experts 0 means dense; MoE layers are layers[::moe_every]."""

    name: str
    base: str
    hidden: int
    layers: int
    heads: int
    ffn: int  # the FFN's (each expert's) intermediate width
    vocab: int
    max_positions: int
    num_experts: int = 0
    top_k: int = 2
    moe_every: int = 2
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4

    @property
    def gated(self) -> bool:
        return self.base != "phi"

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.layers))[::self.moe_every] if self.num_experts else []

    def ffn_parameters(self) -> int:
        """Weights (and biases) of one FFN / expert."""
        if self.gated:
            return 3 * self.hidden * self.ffn
        return 2 * self.hidden * self.ffn + self.ffn + self.hidden


SHAPES: dict[str, LanguageModelShape] = {s.name: s for s in (
    LanguageModelShape("moe-llava-phi2", "phi", 2560, 32, 32, 10240, 51200, 2048, num_experts=4),
    LanguageModelShape("moe-llava-stablelm", "stablelm", 2048, 24, 32, 5632, 100352, 4096, num_experts=4),
    LanguageModelShape("moe-llava-qwen", "qwen", 2048, 24, 16, 5504, 151936, 8192, num_experts=4),
    LanguageModelShape("llava-1.5-7b", "llama", 4096, 32, 32, 11008, 32000, 4096),
    LanguageModelShape("llava-1.5-13b", "llama", 5120, 40, 40, 13824, 32000, 4096),
)}


def shape_named(shape: LanguageModelShape | str) -> LanguageModelShape:
    """A shape, or the one of SHAPES with this name."""
    if isinstance(shape, LanguageModelShape):
        return shape
    if not isinstance(shape, str) or shape not in SHAPES:
        raise ValueError(f"shape must be a LanguageModelShape or one of {sorted(SHAPES)}, got {shape!r}")
    return SHAPES[shape]


def scaled_down(shape: LanguageModelShape | str, layers: int = 4) -> LanguageModelShape:
    """The same structure (FFN kind, biases, MoE layers, experts, top-k, width ratios) at a CPU test size."""
    shape = shape_named(shape)
    hidden = 64
    return replace(shape, hidden=hidden, layers=layers, heads=4, ffn=hidden * shape.ffn // shape.hidden,
                   vocab=256, max_positions=256)


class QwenMLP(nn.Module):
    """Qwen-1's FFN: c_proj(w1(x) * silu(w2(x))), no biases."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(hidden, ffn, bias=False)
        self.c_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


def _moe_section(shape: LanguageModelShape, num_experts: list[int] | None = None) -> dict:
    """MoE-LLaVA's `moe` entry of config.json for this shape: save_pretrained writes it, so
    load_language_model reads the model back with its MoE layers."""
    layers = shape.moe_layers
    # The Qwen family is built on a Qwen2 config with Qwen-1's MLPs (w1, w2, c_proj of the config's
    # intermediate size, where Qwen-1's own config.json gives twice that): said here so it reads back.
    section = {"qwen1_mlp": True} if shape.base == "qwen" else {}
    if not layers:
        return {**section, "moe_enable": False}
    return {**section, "moe_enable": True, "moe_layers_idx": list(layers),
            "num_experts": list(num_experts) if num_experts else [shape.num_experts] * len(layers),
            "top_k_experts": shape.top_k, "capacity_factor": shape.capacity_factor,
            "eval_capacity_factor": shape.eval_capacity_factor, "min_capacity": shape.min_capacity}


def _config(shape: LanguageModelShape, num_experts: list[int] | None = None):
    config = _base_config(shape)
    config.moe = _moe_section(shape, num_experts)
    return config


def _base_config(shape: LanguageModelShape):
    import transformers

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.heads, intermediate_size=shape.ffn,
                  max_position_embeddings=shape.max_positions, tie_word_embeddings=False)
    if shape.base == "phi":
        return transformers.PhiConfig(**common, hidden_act="gelu_new", partial_rotary_factor=0.4)
    if shape.base == "stablelm":
        return transformers.StableLmConfig(**common, hidden_act="silu", partial_rotary_factor=0.25,
                                           use_qkv_bias=True)
    if shape.base == "qwen":
        return transformers.Qwen2Config(**common, hidden_act="silu", rms_norm_eps=1e-6)
    if shape.base == "llama":
        return transformers.LlamaConfig(**common, hidden_act="silu", rms_norm_eps=1e-5)
    raise ValueError(f"unknown base {shape.base!r}")


# config.json fields that change the language model's computation, which _config sets from the family.
_ARCHITECTURE_FIELDS = ("hidden_act", "layer_norm_eps", "rms_norm_eps", "num_key_value_heads", "rope_theta",
                        "partial_rotary_factor", "use_parallel_residual", "qk_layernorm", "use_qkv_bias")


def _check_architecture(path, cfg: dict, config) -> None:
    """A checkpoint whose config.json sets one of these fields otherwise than the family's build is refused,
    naming the field (it would load and compute something else than what was saved)."""
    saved = [(k, v) for source in (cfg, cfg.get("rope_parameters") or {}) for k, v in source.items()]
    wrong = []
    # RoPE scaling (linear, dynamic, YaRN, ...) changes every position's rotation; the families build plain RoPE.
    for field in ("rope_scaling", "rope_parameters"):
        source = cfg.get(field) or {}
        kind = source.get("rope_type", source.get("type", "default")) if isinstance(source, dict) else source
        if kind not in (None, "default"):
            wrong.append(f"{field}={source!r} (built: plain RoPE)")
    for key, value in saved:
        built = compat.config_value(config, key) if key in _ARCHITECTURE_FIELDS else None
        if built is None:
            continue
        same = math.isclose(value, built, rel_tol=1e-9) if isinstance(value, float) and isinstance(built, float) \
            else value == built
        if not same:
            wrong.append(f"{key}={value!r} (built: {built!r})")
    if wrong:
        raise ValueError(f"{path}: config.json sets {', '.join(wrong)}; moecache builds this family's language "
                         "model with the values in parentheses only")


def _causal_lm_class(base: str):
    import transformers

    return {"phi": transformers.PhiForCausalLM, "stablelm": transformers.StableLmForCausalLM,
            "qwen": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM}[base]


def _moe_output_only(module, args, output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def built_in(dtype: torch.dtype):
    """Modules constructed inside get `dtype` parameters: a bf16 model is built in bf16, not first in fp32
    at twice its size (a full-depth VL2-base is 108 GB in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _reinit_expert(expert: nn.Module, generator: torch.Generator) -> None:
    """Distinct random experts (MoE-LLaVA starts them as copies of one FFN; trained, they differ).
    Drawn on the generator's device (an enclosing torch.device context would otherwise pick the model's)."""
    for layer in expert.modules():
        if isinstance(layer, nn.Linear):
            with torch.no_grad():
                w = torch.randn(layer.weight.shape, generator=generator, device=generator.device,
                                dtype=torch.float32)
                layer.weight.copy_((w * layer.in_features ** -0.5).to(layer.weight.dtype))
                if layer.bias is not None:
                    b = torch.randn(layer.bias.shape, generator=generator, device=generator.device,
                                    dtype=torch.float32)
                    layer.bias.copy_((b * 0.1).to(layer.bias.dtype))


def _install_moe(model: nn.Module, shape: LanguageModelShape, moe_class, num_experts: list[int] | None = None,
                 generator: torch.Generator | None = None) -> None:
    layers = model.model.layers
    for i, layer_idx in enumerate(shape.moe_layers):
        layer = layers[layer_idx]
        moe = moe_class(shape.hidden, expert=layer.mlp, num_experts=num_experts[i] if num_experts else shape.num_experts,
                        ep_size=1, k=shape.top_k, capacity_factor=shape.capacity_factor,
                        eval_capacity_factor=shape.eval_capacity_factor, min_capacity=shape.min_capacity,
                        use_residual=False)
        if generator is not None:
            for expert in moe.deepspeed_moe.experts.deepspeed_experts:
                _reinit_expert(expert, generator)
            _reinit_expert(moe.deepspeed_moe.gate, generator)
        moe.register_forward_hook(_moe_output_only)
        layer.mlp = moe


def build_language_model(shape: LanguageModelShape | str, *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", seed: int = 0, moe_class=MoE) -> nn.Module:
    """A causal LM of this shape with random weights (device "meta": no memory, for counting and
    planning at full size). moe_class: the DeepSpeed-MoE layer class (the real `deepspeed.moe.layer.MoE`
    works too)."""
    shape = shape_named(shape)
    config = _config(shape)
    torch.manual_seed(seed)
    with torch.device(device), built_in(dtype):
        model = _causal_lm_class(shape.base)(config)
        if shape.base == "qwen":
            for layer in model.model.layers:
                layer.mlp = QwenMLP(shape.hidden, shape.ffn)
        generator = None if torch.device(device).type == "meta" else torch.Generator().manual_seed(seed)
        _install_moe(model, shape, moe_class, generator=generator)
    return model.to(dtype).eval()


def parameter_count(shape: LanguageModelShape | str) -> dict[str, int]:
    """Weights by part, from the shape alone: experts (all), active per token, and the whole model."""
    shape = shape_named(shape)
    H, L, V = shape.hidden, shape.layers, shape.vocab
    moe_layers = len(shape.moe_layers)
    ffn = shape.ffn_parameters()
    experts = moe_layers * shape.num_experts * ffn
    dense_ffn = (L - moe_layers) * ffn
    routers = moe_layers * shape.num_experts * H
    attention = L * 4 * H * H
    if shape.base in ("phi", "stablelm", "qwen"):
        attention += L * 3 * H  # q/k/v biases
    if shape.base == "phi":
        attention += L * H  # dense (output) bias
    norms = (L * (1 if shape.base == "phi" else 2) + 1) * H * (2 if shape.base in ("phi", "stablelm") else 1)
    embeddings = 2 * V * H + (V if shape.base == "phi" else 0)  # input and output (untied); Phi's lm_head bias
    total = experts + dense_ffn + routers + attention + norms + embeddings
    active = total - experts + moe_layers * shape.top_k * ffn
    return {"experts": experts, "active": active, "total": total}


# ------------------------------------------------------------------ local checkpoints
_MODEL_TYPES = {"moe_llava_phi": "phi", "moe_llava_stablelm": "stablelm", "moe_llava_qwen": "qwen",
                "llava_llama": "llama", "llava": "llama", "phi": "phi", "stablelm": "stablelm", "qwen": "qwen",
                "llama": "llama"}


_REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


def _shape_from_config(cfg: dict) -> tuple[LanguageModelShape, list[int] | None]:
    model_type = cfg.get("model_type")
    if isinstance(cfg.get("text_config"), dict) and not all(k in cfg for k in _REQUIRED_FIELDS):
        raise ValueError("config.json keeps the language model under text_config (the llava-hf layout); "
                         "moecache loads the original LLaVA / MoE-LLaVA layout, with the fields at the top level")
    moe = cfg.get("moe") or {}
    built_qwen = model_type == "qwen2" and moe.get("qwen1_mlp") is True  # saved from moecache's Qwen build
    if model_type not in _MODEL_TYPES and not built_qwen:
        raise ValueError(f"config.json model_type {model_type!r} is not one of {sorted(_MODEL_TYPES)}")
    absent = [k for k in _REQUIRED_FIELDS if k not in cfg]
    if absent:
        raise ValueError(f"config.json lacks {', '.join(absent)}")
    base = "qwen" if built_qwen else _MODEL_TYPES[model_type]
    # Qwen-1's config.json: w1, w2 of half its intermediate_size
    ffn = cfg["intermediate_size"] // 2 if base == "qwen" and not built_qwen else cfg["intermediate_size"]
    layers_idx = moe.get("moe_layers_idx") if moe.get("moe_enable", bool(moe)) else None
    num_experts = moe.get("num_experts") if layers_idx else None
    if isinstance(num_experts, int):
        num_experts = [num_experts] * len(layers_idx)
    if layers_idx and (not isinstance(num_experts, list) or len(num_experts) != len(layers_idx)):
        raise ValueError(f"config.json moe.num_experts {num_experts!r} must be one count, or one per layer of "
                         f"moe.moe_layers_idx ({len(layers_idx)})")
    every = 2
    if layers_idx:
        every = layers_idx[1] - layers_idx[0] if len(layers_idx) > 1 else cfg["num_hidden_layers"]
        if list(range(cfg["num_hidden_layers"]))[::every] != list(layers_idx):
            raise ValueError(f"moe_layers_idx {layers_idx} is not every {every}th layer from 0; only MoE-LLaVA's "
                             "'sparse' layout (and other regular strides) is supported")
    shape = LanguageModelShape(
        name=str(cfg.get("_name_or_path", model_type)), base=base, hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"], ffn=ffn, vocab=cfg["vocab_size"],
        max_positions=cfg.get("max_position_embeddings", cfg.get("seq_length", 2048)),
        num_experts=max(num_experts) if num_experts else 0, top_k=moe.get("top_k_experts", 2), moe_every=every,
        capacity_factor=moe.get("capacity_factor", 1.0), eval_capacity_factor=moe.get("eval_capacity_factor", 1.0),
        min_capacity=moe.get("min_capacity", 4))
    return shape, num_experts


def qwen1_key(key: str, tensor: torch.Tensor, heads_dim: int) -> list[tuple[str, torch.Tensor]]:
    """A Qwen-1 state-dict entry under the Qwen2 class's names (c_attn split into q, k, v)."""
    if key.startswith("transformer.wte."):
        return [(key.replace("transformer.wte.", "model.embed_tokens."), tensor)]
    if key.startswith("transformer.ln_f."):
        return [(key.replace("transformer.ln_f.", "model.norm."), tensor)]
    if not key.startswith("transformer.h."):
        return [(key, tensor)]
    key = key.replace("transformer.h.", "model.layers.", 1)
    for old, new in ((".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                     (".attn.c_proj.", ".self_attn.o_proj.")):
        if old in key:
            return [(key.replace(old, new), tensor)]
    if ".attn.c_attn." in key:
        q, k, v = tensor.split(heads_dim, dim=0)
        return [(key.replace(".attn.c_attn.", f".self_attn.{p}_proj."), t) for p, t in (("q", q), ("k", k), ("v", v))]
    return [(key, tensor)]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def load_language_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        moe_class=MoE) -> nn.Module:
    """The language model of a local MoE-LLaVA (or LLaVA-1.5) checkpoint directory: config.json and its
    weights (*.safetensors or pytorch_model*.bin). The vision tower and projector weights are not
    loaded (the language model is what moecache runs); every language-model weight must be present."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"path {str(path)!r} has no config.json")
    cfg = json.loads(config_file.read_text())
    shape, num_experts = _shape_from_config(cfg)
    saved = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    dtype = dtype or getattr(torch, saved, torch.float32)
    config = _config(shape, num_experts)
    _check_architecture(path, cfg, config)
    with compat.skip_weight_init(), torch.device(device):
        model = _causal_lm_class(shape.base)(config)
        if shape.base == "qwen":
            for layer in model.model.layers:
                layer.mlp = QwenMLP(shape.hidden, shape.ffn)
        _install_moe(model, shape, moe_class, num_experts)
    model = model.to(dtype)
    state = _read_weights(path)
    if shape.base == "qwen":
        state = dict(kv for key, t in state.items() for kv in qwen1_key(key, t, shape.hidden))
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(usable))
    if missing:
        raise ValueError(f"{path}: {len(missing)} language-model weights missing from the checkpoint, "
                         f"e.g. {missing[:3]}")
    # Weights outside the language model (vision tower, projector) are left out; unknown ones inside it
    # (an expert the config does not count, a layer norm this build lacks) mean the model is not the one saved.
    # (rotary_emb.inv_freq: a buffer older transformers saved with the weights, recomputed from the config.)
    language_model = {".".join(k.split(".")[:2]) for k in own}
    unknown = sorted(k for k in state if k not in own and ".".join(k.split(".")[:2]) in language_model
                     and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} language-model weights in the checkpoint that the model its "
                         f"config.json describes does not have, e.g. {unknown[:3]}")
    model.load_state_dict(usable, strict=True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the checkpoint's special tokens, for generate
        if cfg.get(key) is not None:
            setattr(model.config, key, cfg[key])
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, key, cfg[key])
    return model.eval()
