"""Train the tiny DeepSeek-V2-style MoE language model shipped as `moecache/data/tiny_moe/`.

Random-weight MoE models route without structure, so expert prediction and caching cannot be judged
on them; this model is small enough to train on one CPU thread in ~20 minutes and ship in the wheel
(fp16, a few MB), yet its routers have learned which experts fit which bytes in which context.

Model: `transformers.DeepseekV2ForCausalLM`, byte-level (256 bytes + BOS/EOS/PAD), hidden 128,
4 decoder layers (layer 0 dense, intermediate 256; layers 1-3 MoE: 32 routed experts of
intermediate 64, top-4 greedy over softmax scores, unnormalized weights, 1 shared expert), MLA
attention (4 heads, kv_lora_rank 32, no q LoRA, qk_nope 16 + qk_rope 16, v 16), 512 positions.

Data: the Python standard library's own *.py sources (`sysconfig.get_paths()["stdlib"]`; test
directories, site-packages and the codec tables in encodings/ skipped), as raw UTF-8 bytes, each
file framed by BOS ... EOS; files are split train/validation by a seeded shuffle (5% validation).

Loss: next-byte cross entropy + 0.01 x Switch load-balancing loss per MoE layer
(E * sum_e f_e * P_e, f_e = share of the routed slots expert e took, P_e = its mean softmax
probability), read from forward hooks on each MoE block's router (`mlp.gate`, which returns
(router_logits, topk_weights, topk_indices) in transformers 5.x). AdamW, linear warmup then cosine
decay, fp32, one thread, deterministic seeds.

Writes config.json + model.safetensors (fp16), heldout.txt (~32 KB of validation-split files) and
TRAINING.md (command, time, metrics, lookahead-gating recall) into --out.

    python bench/train_tiny_moe.py                      # the shipped model (~20 min, 1 CPU thread)
    python bench/train_tiny_moe.py --steps 20 --out /tmp/tiny_moe   # a smoke run / step timing
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "moecache" / "data" / "tiny_moe"
BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE = 256, 257, 258, 259  # the same as moecache.data
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "encodings"}
SEQ_LEN = 256
HELDOUT_BYTES = 32 * 1024
HELDOUT_PER_FILE = 8 * 1024


def make_config():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=64,
        kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        topk_method="greedy", n_group=None, topk_group=None, norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=512, hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
        use_cache=True,
    )


# ------------------------------------------------------------------ data
def stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("test") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_"):
            continue
        files.append(rel.as_posix())
    return root, sorted(files)


def read_utf8(path: Path) -> bytes | None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def split_files(files: list[str], seed: int, val_frac: float = 0.05) -> tuple[list[str], list[str]]:
    order = list(files)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_frac))
    return order[n_val:], order[:n_val]


def build_stream(root: Path, files: list[str]) -> tuple[torch.Tensor, int, int]:
    """All files as one int16 token stream, each file framed BOS ... EOS; (stream, files used, bytes)."""
    parts, used, nbytes = [], 0, 0
    for rel in files:
        data = read_utf8(root / rel)
        if data is None or not data:
            continue
        parts.append(torch.tensor([BOS_ID], dtype=torch.int16))
        parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16))
        parts.append(torch.tensor([EOS_ID], dtype=torch.int16))
        used += 1
        nbytes += len(data)
    return torch.cat(parts), used, nbytes


def heldout_text(root: Path, val_files: list[str]) -> tuple[str, list[str]]:
    """Up to HELDOUT_PER_FILE bytes (whole lines) from each validation file in split order, HELDOUT_BYTES in all."""
    pieces, sources, total = [], [], 0
    for rel in val_files:
        data = read_utf8(root / rel)
        if not data:
            continue
        budget = min(HELDOUT_PER_FILE, HELDOUT_BYTES - total)
        if budget < 1024:
            break
        if len(data) > budget:
            data = data[: data.rfind(b"\n", 0, budget) + 1]
            if not data:
                continue
        pieces.append(data)
        sources.append(rel)
        total += len(data)
    return b"".join(pieces).decode("utf-8"), sources


# ------------------------------------------------------------------ loss pieces
class BalanceLoss:
    """Switch-style load balancing from forward hooks on the routers: E * sum_e f_e * P_e per layer."""

    def __init__(self, model):
        self.terms: list[torch.Tensor] = []
        self.enabled = True
        self.handles = []
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                self.handles.append(gate.register_forward_hook(self._hook))

    def _hook(self, module, args, out):
        if not self.enabled:
            return
        logits, _, topk = out  # [T, E] fp32, [T, K], [T, K]
        n_exp = logits.shape[-1]
        probs = logits.softmax(dim=-1).mean(dim=0)
        frac = torch.bincount(topk.reshape(-1), minlength=n_exp).to(probs.dtype) / topk.numel()
        self.terms.append(n_exp * (frac * probs).sum())

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total


@torch.no_grad()
def bits_per_byte(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross entropy in bits over windows [N, L+1] (inputs [:, :-1], targets [:, 1:])."""
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        w = windows[s:s + batch_size].long()
        logits = model(w[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    return total / count / math.log(2)


def text_windows(text: str, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] of the text's bytes (the tail shorter than a window dropped)."""
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def heldout_metrics(model, text: str) -> dict:
    """bits/byte (each window scored on its own, targets = the window's next bytes) and routing stats."""
    from moecache.analysis.traces import record_layer_inputs

    win = text_windows(text)
    # bits/byte within windows: predict bytes 1..L-1 of each window from what precedes them in it.
    total, count = 0.0, 0
    for s in range(0, win.shape[0], 16):
        w = win[s:s + 16]
        logits = model(w, use_cache=False).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    trace = record_layer_inputs(model, win.reshape(1, -1))
    cfg = model.config
    n_exp, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    layers = {}
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        topk = trace[i]["topk_ids"]
        counts = torch.bincount(topk.reshape(-1), minlength=n_exp)
        gate_w = model.model.layers[i].mlp.gate.weight.float()
        pred = (trace[i - 1]["hidden"] @ gate_w.t()).topk(k, dim=-1).indices
        hits = (pred.unsqueeze(-1) == topk.unsqueeze(-2)).any(-1).sum(-1).float()
        recall = (hits / k).mean().item()
        recall2 = None
        if i - 2 >= 0:
            pred2 = (trace[i - 2]["hidden"] @ gate_w.t()).topk(k, dim=-1).indices
            recall2 = ((pred2.unsqueeze(-1) == topk.unsqueeze(-2)).any(-1).sum(-1).float() / k).mean().item()
        # How much of the top-1 choice the current byte alone explains (bits): high at random init,
        # where the residual stream is still mostly the token embedding.
        top1 = trace[i]["router_logits"].argmax(-1)
        joint = torch.zeros(VOCAB_SIZE, n_exp)
        joint.index_put_((win.reshape(-1), top1), torch.ones(top1.numel()), accumulate=True)
        joint /= joint.sum()
        indep = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        nz = joint > 0
        layers[i] = {
            "byte_mi": (joint[nz] * (joint[nz] / indep[nz]).log2()).sum().item(),
            "experts_used": int((counts > 0).sum()),
            "max_share": counts.max().item() / topk.numel(),
            "min_share": counts.min().item() / topk.numel(),
            "recall_prev": recall,
            "recall_prev2": recall2,
        }
    return {"bpb": total / count / math.log(2), "tokens": win.numel(), "layers": layers}


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    import transformers
    from transformers import DeepseekV2ForCausalLM

    t_start = time.perf_counter()
    root, files = stdlib_files()
    train_files, val_files = split_files(files, args.seed)
    train, n_train_files, train_bytes = build_stream(root, train_files)
    val, n_val_files, val_bytes = build_stream(root, val_files)
    held, held_sources = heldout_text(root, val_files)
    print(f"data: {root} ({platform.python_version()}): {n_train_files} train files ({train_bytes / 1e6:.2f} MB), "
          f"{n_val_files} validation files ({val_bytes / 1e6:.2f} MB); held-out sample {len(held.encode())} bytes "
          f"from {len(held_sources)} files", flush=True)
    n_eval = 128
    starts = torch.linspace(0, val.numel() - SEQ_LEN - 2, n_eval).long()
    val_windows = torch.stack([val[s:s + SEQ_LEN + 1] for s in starts.tolist()])

    config = make_config()
    model = DeepseekV2ForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: {n_params / 1e6:.3f}M parameters ({n_expert / 1e6:.3f}M in routed experts); "
          f"experts implementation {model.config._experts_implementation}", flush=True)
    model.eval()
    init = heldout_metrics(model, held)  # the same seed's random weights, for comparison (uses no RNG)
    model.train()
    print(f"random init: held-out {init['bpb']:.3f} bits/byte; lookahead recall "
          + ", ".join(f"layer {i} {m['recall_prev']:.3f}" for i, m in init["layers"].items()), flush=True)
    balance = BalanceLoss(model)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step <= args.warmup:
            return args.lr * step / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    history = []
    window_ce, window_aux, recent_ce = [], [], []
    t_train = time.perf_counter()
    t_log = t_train
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, train.numel() - SEQ_LEN - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[i:i + SEQ_LEN + 1] for i in idx.tolist()]).long()
        logits = model(batch[:, :-1], use_cache=False).logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = balance.pop()
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window_ce.append(ce.item())
        window_aux.append(aux.item())
        recent_ce.append(ce.item())
        recent_ce = recent_ce[-50:]
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            mean_ce = sum(window_ce) / len(window_ce)
            print(f"step {step:5d}  lr {lr_at(step):.2e}  train loss {mean_ce:.4f} ({mean_ce / math.log(2):.3f} bits/byte)"
                  f"  balance {sum(window_aux) / len(window_aux):.3f}  {(now - t_log) / len(window_ce):.3f} s/step"
                  f"  elapsed {now - t_train:.0f} s", flush=True)
            window_ce, window_aux, t_log = [], [], now
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            balance.enabled = False
            vb = bits_per_byte(model, val_windows, args.batch)
            balance.enabled = True
            model.train()
            history.append((step, sum(recent_ce) / len(recent_ce), vb))
            print(f"step {step:5d}  validation {vb:.4f} bits/byte", flush=True)
            t_log = time.perf_counter()  # keep the eval out of s/step
    train_s = time.perf_counter() - t_train
    final_train_loss = sum(recent_ce) / len(recent_ce)

    # Ship fp16; measure what ships (fp16 weights loaded back in fp32), as moecache.data.load_tiny_moe does.
    for h in balance.handles:
        h.remove()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    model.eval().half()
    model.save_pretrained(out, safe_serialization=True)
    (out / "heldout.txt").write_text(held, encoding="utf-8")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the files ship in the wheel
    shipped = DeepseekV2ForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    val_bpb = bits_per_byte(shipped, val_windows, args.batch)
    hm = heldout_metrics(shipped, held)
    total_s = time.perf_counter() - t_start
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != "TRAINING.md"}

    print(f"shipped (fp16): validation {val_bpb:.4f} bits/byte; held-out sample {hm['bpb']:.4f} bits/byte", flush=True)
    for i, m in hm["layers"].items():
        r2 = f"{m['recall_prev2']:.3f}" if m["recall_prev2"] is not None else "-"
        print(f"layer {i}: experts used {m['experts_used']}/{config.n_routed_experts}, max share {m['max_share']:.3f}, "
              f"min share {m['min_share']:.4f}, lookahead recall from layer {i - 1}: {m['recall_prev']:.3f}, "
              f"from layer {i - 2}: {r2}", flush=True)
    print(f"files: {sizes} = {sum(sizes.values()) / 1e6:.2f} MB; training {train_s:.0f} s, total {total_s:.0f} s", flush=True)

    write_training_md(out, args, argv, config, n_params, n_expert, train_s, total_s, final_train_loss, val_bpb, hm,
                      init, history, sizes, root, n_train_files, train_bytes, n_val_files, val_bytes, held, held_sources,
                      transformers.__version__)


def write_training_md(out, args, argv, config, n_params, n_expert, train_s, total_s, final_train_loss, val_bpb, hm,
                      init, history, sizes, root, n_train_files, train_bytes, n_val_files, val_bytes, held, held_sources,
                      tf_version) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python bench/train_tiny_moe.py", *argv])
    k, e = config.num_experts_per_tok, config.n_routed_experts
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    rows = "\n".join(
        f"| {i} | {m['experts_used']}/{e} | {m['max_share']:.3f} | {m['min_share']:.4f} | {m['recall_prev']:.3f} | "
        f"{fmt(m['recall_prev2'], '.3f')} | {m['byte_mi']:.2f} |"
        for i, m in hm["layers"].items())
    init_rows = "\n".join(
        f"| {i} | {m['experts_used']}/{e} | {m['max_share']:.3f} | {m['min_share']:.4f} | {m['recall_prev']:.3f} | "
        f"{fmt(m['recall_prev2'], '.3f')} | {m['byte_mi']:.2f} |"
        for i, m in init["layers"].items())
    hist = "\n".join(f"| {s} | {tl:.4f} ({tl / math.log(2):.3f} bits/byte) | {vb:.4f} |" for s, tl, vb in history)
    files = "\n".join(f"| {name} | {size:,} |" for name, size in sizes.items())
    text = f"""# tiny_moe: how it was trained

A byte-level DeepSeek-V2-style MoE language model (`transformers.DeepseekV2ForCausalLM`) trained by
this project so that routing has learned structure (random-weight models route without it). Load it
with `moecache.data.load_tiny_moe()`; `moecache.data.validation_text()` returns `heldout.txt`.

- Command: `{cmd}` (from the repository root)
- Date: {_dt.date.today().isoformat()}; Python {platform.python_version()}, torch {torch.__version__}, transformers {tf_version}; CPU, fp32, {args.threads} thread
- Steps: {args.steps} x batch {args.batch} x {SEQ_LEN} bytes ({args.steps * args.batch * SEQ_LEN / 1e6:.1f}M tokens); seed {args.seed}
- Wall time: training {train_s / 60:.1f} min ({train_s:.0f} s), whole script {total_s / 60:.1f} min
- Optimizer: AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr}, {args.warmup} warmup steps, cosine to {args.min_lr_ratio} x peak, grad-norm clip 1.0
- Loss: next-byte cross entropy + {args.aux_coef} x sum over MoE layers of the Switch load-balancing loss E * sum_e f_e * P_e (from forward hooks on each `mlp.gate`)
- Final train loss (mean of the last 50 steps): {final_train_loss:.4f} nats/byte = {final_train_loss / math.log(2):.3f} bits/byte
- Validation (128 windows of {SEQ_LEN} bytes from the validation files, shipped fp16 weights): **{val_bpb:.4f} bits/byte**
- Held-out sample `heldout.txt` ({len(held.encode())} bytes, {hm['tokens']} scored in windows of {SEQ_LEN}): **{hm['bpb']:.4f} bits/byte** (uniform: 8)

## Model

hidden 128, 4 decoder layers (layer 0 dense MLP, intermediate {config.intermediate_size}; layers
{config.first_k_dense_replace}-{config.num_hidden_layers - 1} MoE: {e} routed experts of intermediate
{config.moe_intermediate_size}, top-{k} `greedy` over softmax scores, norm_topk_prob False,
routed_scaling_factor 1.0, {config.n_shared_experts} shared expert), MLA attention ({config.num_attention_heads}
heads, kv_lora_rank {config.kv_lora_rank}, q_lora_rank None, qk_nope {config.qk_nope_head_dim} + qk_rope
{config.qk_rope_head_dim}, v {config.v_head_dim}), vocabulary {config.vocab_size} (bytes 0-255, BOS 256, EOS 257, PAD 258),
max_position_embeddings {config.max_position_embeddings}, untied embeddings.
{n_params:,} parameters ({n_expert:,} in routed experts); stored in fp16.

| file | bytes |
| --- | --- |
{files}

Total {sum(sizes.values()) / 1e6:.2f} MB.

## Data

The *.py sources of this machine's Python {platform.python_version()} standard library
(`sysconfig.get_paths()["stdlib"]` = `{root}`), recursively, skipping directories named
{", ".join(sorted(SKIP_DIRS))} or starting with `test`, files named `test_*.py`, and files that are
not valid UTF-8; read as raw bytes, each file framed BOS ... EOS. Split by file with
`random.Random({args.seed}).shuffle` of the sorted relative paths, 5% to validation:
{n_train_files} train files ({train_bytes / 1e6:.2f} MB), {n_val_files} validation files ({val_bytes / 1e6:.2f} MB).
Training batches are random {SEQ_LEN + 1}-byte crops of the train stream.
`heldout.txt`: up to {HELDOUT_PER_FILE // 1024} KB (whole lines) from each validation file in split order,
{HELDOUT_BYTES // 1024} KB at most: {", ".join(held_sources)}.

## Routing on the held-out sample (shipped weights)

Lookahead recall: for every token, the top-{k} experts that layer l's router picks from the input of
layer l-1's MLP block (its post_attention_layernorm output, what moecache's LookaheadPredictor is
given), against the top-{k} layer l actually used: |predicted & actual| / {k}, averaged over tokens.
Chance is {k}/{e} = {k / e:.3f}. For layer {config.first_k_dense_replace} the previous layer is the dense layer.

"byte MI" is the mutual information (bits) between a token's top-1 expert and its own byte value
(the top-1 choice carries at most log2({e}) = {math.log2(e):.0f} bits).

| layer | experts used | max share of slots | min share | recall from l-1 | recall from l-2 | byte MI |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

For comparison, the same seed's random initial weights (held-out {init['bpb']:.3f} bits/byte):

| layer | experts used | max share of slots | min share | recall from l-1 | recall from l-2 | byte MI |
| --- | --- | --- | --- | --- | --- | --- |
{init_rows}

Lookahead recall alone does not tell learned routing from random: at random init the residual stream
is still mostly the token embedding, so every layer routes by the current byte and the layers agree
(high recall, high byte MI, unbalanced load). After training the routers are balanced (the
load-balancing loss) and route on context beyond the current byte, and recall from layer l-1 stays
4-5x chance. `tests/test_tiny_moe.py` checks bits/byte, balance and recall on every run, with margins
(bits/byte ~0.5 above, recall ~0.1 below the values here).

## Training curve

| step | train loss (last 50 steps) | validation bits/byte |
| --- | --- | --- |
{hist}
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
