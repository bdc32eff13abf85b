"""Fakes of DeepSeek's own modelling code (the DeepSeek-V2 / DeepSeek-VL2 repositories' remote code,
which transformers does not ship): MoE blocks with an nn.ModuleList of experts and `moe_infer`, and MLA
attention with its own rotary embedding and 4.x-era cache calls. moecache must find them by structure."""
import torch
import transformers

R, P = 16, 8  # kv_lora_rank, qk_rope_head_dim of the fake attention


# ------------------------------------------------------------------ MoE blocks
class VL2MLP(torch.nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VL2MoEGate(torch.nn.Module):
    """Mirrors DeepSeek-VL2's MoEGate: softmax scores, greedy top-k, routed scaling (VL2-Tiny/Small)."""

    def __init__(self, hidden, n_experts, top_k, scaling):
        super().__init__()
        self.top_k, self.scaling = top_k, scaling
        self.weight = torch.nn.Parameter(torch.randn(n_experts, hidden) / hidden**0.5)

    def forward(self, hidden_states):
        h = hidden_states.view(-1, hidden_states.shape[-1])
        scores = torch.nn.functional.linear(h.float(), self.weight.float()).softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return topk_idx, topk_weight * self.scaling, None


class VL2MoE(torch.nn.Module):
    """The structure of DeepSeek-VL2's DeepseekV2MoE: gate, experts ModuleList, shared_experts, moe_infer."""

    def __init__(self, hidden=48, inter=24, n_experts=6, top_k=2):
        super().__init__()
        self.experts = torch.nn.ModuleList(VL2MLP(hidden, inter) for _ in range(n_experts))
        self.gate = VL2MoEGate(hidden, n_experts, top_k, scaling=1.5)
        self.shared_experts = VL2MLP(hidden, 2 * inter)

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        y = self.moe_infer(hidden_states.view(-1, shape[-1]), topk_idx, topk_weight).view(*shape)
        return y + self.shared_experts(identity)

    @torch.no_grad()
    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts))).scatter_(1, topk_ids, 1).sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        outputs, start = [], 0
        for i, n in enumerate(cnts.tolist()):
            if n:
                outputs.append(self.experts[i](sorted_tokens[start:start + n]))
            start += n
        outs = torch.cat(outputs, dim=0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(-1)).sum(dim=1).type(new_x.dtype)


class FlatRoutesMoE(VL2MoE):
    """DeepSeek-MoE's own code (deepseek-moe-16b): moe_infer takes the routes flattened token by token,
    [T*K] ids and [T*K, 1] weights."""

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        flat = hidden_states.view(-1, shape[-1])
        y = self.moe_infer(flat, topk_idx.view(-1), topk_weight.view(-1, 1)).view(*shape)
        return y + self.shared_experts(identity)

    @torch.no_grad()
    def moe_infer(self, x, flat_expert_indices, flat_expert_weights):
        out = torch.zeros_like(x)
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.gate.top_k)
        for i, expert in enumerate(self.experts):
            chosen = flat_expert_indices == i
            if chosen.any():
                out.index_add_(0, tokens[chosen], expert(x[tokens[chosen]]) * flat_expert_weights[chosen].to(x.dtype))
        return out


class VL2LanguageModel(torch.nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.config = transformers.PretrainedConfig(hidden_act="silu")
        self.config.model_type = "deepseek_vl_v2_language"  # unknown to the registry: structural detection
        self.layers = torch.nn.ModuleList(VL2MoE() for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = x + block(torch.nn.functional.layer_norm(x, x.shape[-1:]))
        return x


# ------------------------------------------------------------------ MLA attention
class VL2RotaryEmbedding(torch.nn.Module):
    def __init__(self, dim, max_position_embeddings=64, base=10000.0):
        super().__init__()
        self.max_position_embeddings = max_position_embeddings
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(max_position_embeddings, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, x, seq_len):
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim=1):
    """DeepSeek's own convention: de-interleave the pairs, then rotate halves; tables indexed by position."""
    cos, sin = cos[position_ids].unsqueeze(unsqueeze_dim), sin[position_ids].unsqueeze(unsqueeze_dim)

    def deinterleave(x):
        b, h, s, d = x.shape
        return x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)

    q, k = deinterleave(q), deinterleave(k)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class VL2Attention(torch.nn.Module):
    """Shaped like the DeepSeek-VL2 repository's DeepseekV2Attention (MLA, no q_lora, 4.x cache calls)."""

    def __init__(self, hidden, heads, layer_idx):
        super().__init__()
        self.num_heads, self.layer_idx, self.q_lora_rank = heads, layer_idx, None
        self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim = R, P, 8, 12
        self.q_head_dim = self.qk_nope_head_dim + P
        self.softmax_scale = self.q_head_dim ** -0.5
        self.q_proj = torch.nn.Linear(hidden, heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = torch.nn.Linear(hidden, R + P, bias=False)
        self.kv_a_layernorm = torch.nn.RMSNorm(R, eps=1e-6)
        self.kv_b_proj = torch.nn.Linear(R, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = torch.nn.Linear(heads * self.v_head_dim, hidden, bias=False)
        self.rotary_emb = VL2RotaryEmbedding(P)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        B, S, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, S, self.num_heads, self.q_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, P], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([R, P], dim=-1)
        k_pe = k_pe.view(B, S, 1, P).transpose(1, 2)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, S, self.num_heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        past = past_key_value.get_seq_length(self.layer_idx) if past_key_value is not None else 0
        cos, sin = self.rotary_emb(value, seq_len=past + S)
        q_pe, k_pe = apply_rotary_pos_emb(q_pe, k_pe, cos, sin, position_ids)
        query = torch.cat([q_nope, q_pe], dim=-1)
        key = torch.cat([k_nope, k_pe.expand(-1, self.num_heads, -1, -1)], dim=-1)
        if past_key_value is not None:
            key, value = past_key_value.update(key, value, self.layer_idx)
        causal = torch.ones(S, key.shape[2], dtype=torch.bool).tril(diagonal=key.shape[2] - S)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=causal,
                                                               scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), None, past_key_value


class VL2AttentionStack(torch.nn.Module):
    def __init__(self, vocab=50, hidden=32, heads=4, layers=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(VL2Attention(hidden, heads, i) for i in range(layers))
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids, past_key_values, position_ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer(h, position_ids=position_ids, past_key_value=past_key_values)[0]
        return self.head(h)
