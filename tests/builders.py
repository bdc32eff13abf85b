"""Random inputs and tiny models the tests share: experts and routing never of zeros, tiny transformers
models built from config classes (no download), randomised so no bias or correction term stays at its
initial zero."""
import torch

from moecache.ops.reference import route_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_layer(T, H, I, E, K, dtype, device=DEVICE, seed=0):
    """(x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], topk_weights [T, K], topk_ids [T, K])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w_down = torch.randn(E, H, I, generator=g) / I**0.5
    weights, ids = route_reference(torch.randn(T, E, generator=g), K)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), w_gate_up.to(**to), w_down.to(**to), weights.to(device), ids.to(device)


def random_layers(L=3, E=8, H=32, I=16, dtype=torch.float32, seed=0, gated=True):
    """L layers of experts on the CPU: [(w_gate_up [E, 2I, H], w_down [E, H, I])], or with gated=False
    [(fc1 [E, I, H], fc2 [E, H, I])]."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * I if gated else I
    return [((torch.randn(E, rows, H, generator=g) / H**0.5).to(dtype),
             (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)) for _ in range(L)]


# ------------------------------------------------------------------ tiny transformers models
COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def deepseek_config(version="v2", **overrides):
    """A tiny DeepSeek-V2 / V3 config: 8 experts of 32, top-3, one shared expert, MLA (R=16, P=8)."""
    kw = dict(COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
              qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.0)
    kw.update(overrides)
    import transformers

    return (transformers.DeepseekV2Config if version == "v2" else transformers.DeepseekV3Config)(**kw)


def deepseek(version="v2", seed=1, **overrides):
    import transformers

    cls = transformers.DeepseekV2ForCausalLM if version == "v2" else transformers.DeepseekV3ForCausalLM
    return randomize(cls(deepseek_config(version, **overrides)), seed)


def randomize(model, seed=0, std_1d=0.3):
    """Every parameter random (norm weights aside), correction biases too; eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                continue
            p.normal_(0, std_1d if p.dim() == 1 else p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    return model.eval()


def count_host_reads(monkeypatch) -> list:
    """Every tensor-to-host read (each one a host sync on a GPU), recorded by name."""
    reads = []
    for name in ("tolist", "item", "__int__", "__bool__", "__index__", "__float__"):
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    return reads
