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

With `--family moe-llava` it trains instead the MoE-LLaVA-style model shipped as
`moecache/data/tiny_moe_llava/` on the same data, loop, schedule and split: StableLM base
(`moecache.models.llava`, byte vocabulary, hidden 128, 4 layers, 4 heads, FFN 256, 512 positions) with
DeepSpeed-MoE layers (4 experts, top-2, capacity factor 1.5 in training, on layers[::2] as MoE-LLaVA's
sparse mode), loss + 0.01 x the sum of the gates' l_aux (MoE-LLaVA's router aux loss); it writes a
MoE-LLaVA checkpoint directory (config.json with a "moe" section, fp16 safetensors) that
`moecache.models.llava.load_language_model` loads, and TRAINING.md (routing balance, temporal locality).
Its held-out text is tiny_moe's heldout.txt (the same split), not written twice.

    python bench/train_tiny_moe.py                      # the shipped model (~20 min, 1 CPU thread)
    python bench/train_tiny_moe.py --steps 20 --out /tmp/tiny_moe   # a smoke run / step timing
    python bench/train_tiny_moe.py --family moe-llava --steps 550 --warmup 50 --micro-batch 4 --eval-every 110
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
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
FAMILIES = ("deepseek", "moe-llava")
DEFAULT_OUTS = {"deepseek": DEFAULT_OUT, "moe-llava": REPO / "moecache" / "data" / "tiny_moe_llava"}
DEFAULT_STEPS = {"deepseek": 1300, "moe-llava": 550}
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


# ------------------------------------------------------------------ data and loop (both families)
def load_data(seed: int) -> dict:
    """The stdlib streams split by file, the held-out sample and 128 validation windows of SEQ_LEN + 1."""
    root, files = stdlib_files()
    train_files, val_files = split_files(files, seed)
    train, n_train_files, train_bytes = build_stream(root, train_files)
    val, n_val_files, val_bytes = build_stream(root, val_files)
    held, held_sources = heldout_text(root, val_files)
    print(f"data: {root} ({platform.python_version()}): {n_train_files} train files ({train_bytes / 1e6:.2f} MB), "
          f"{n_val_files} validation files ({val_bytes / 1e6:.2f} MB); held-out sample {len(held.encode())} bytes "
          f"from {len(held_sources)} files", flush=True)
    n_eval = 128
    starts = torch.linspace(0, val.numel() - SEQ_LEN - 2, n_eval).long()
    val_windows = torch.stack([val[s:s + SEQ_LEN + 1] for s in starts.tolist()])
    return {"root": root, "train": train, "held": held, "held_sources": held_sources, "val_windows": val_windows,
            "n_train_files": n_train_files, "train_bytes": train_bytes, "n_val_files": n_val_files,
            "val_bytes": val_bytes}


def train_loop(model, args, train: torch.Tensor, aux_loss, evaluate) -> tuple[list, float, float]:
    """AdamW with linear warmup and cosine decay on random SEQ_LEN + 1 crops of `train`; loss = cross
    entropy + args.aux_coef * aux_loss() (called after each forward). A batch runs as chunks of
    args.micro_batch sequences (gradients accumulated; all of it at once by default). evaluate() gives
    validation bits/byte every args.eval_every steps. Returns (history, training seconds, final loss)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step <= args.warmup:
            return args.lr * step / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    micro = args.micro_batch or args.batch
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
        opt.zero_grad(set_to_none=True)
        ce_sum, aux_sum = 0.0, 0.0
        for chunk in batch.split(micro):
            logits = model(chunk[:, :-1], use_cache=False).logits
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
            aux = aux_loss()
            loss = ce + args.aux_coef * aux
            if chunk.shape[0] != batch.shape[0]:
                loss = loss * (chunk.shape[0] / batch.shape[0])
            loss.backward()
            ce_sum += ce.item() * chunk.shape[0] / batch.shape[0]
            aux_sum += aux.item() * chunk.shape[0] / batch.shape[0]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window_ce.append(ce_sum)
        window_aux.append(aux_sum)
        recent_ce.append(ce_sum)
        recent_ce = recent_ce[-50:]
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            mean_ce = sum(window_ce) / len(window_ce)
            print(f"step {step:5d}  lr {lr_at(step):.2e}  train loss {mean_ce:.4f} ({mean_ce / math.log(2):.3f} bits/byte)"
                  f"  balance {sum(window_aux) / len(window_aux):.3f}  {(now - t_log) / len(window_ce):.3f} s/step"
                  f"  elapsed {now - t_train:.0f} s", flush=True)
            window_ce, window_aux, t_log = [], [], now
        if step % args.eval_every == 0 or step == args.steps:
            vb = evaluate()
            history.append((step, sum(recent_ce) / len(recent_ce), vb))
            print(f"step {step:5d}  validation {vb:.4f} bits/byte", flush=True)
            t_log = time.perf_counter()  # keep the eval out of s/step
    return history, time.perf_counter() - t_train, sum(recent_ce) / len(recent_ce)


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=FAMILIES, default="deepseek",
                    help="deepseek: the DeepSeek-V2-style model (tiny_moe/); moe-llava: the MoE-LLaVA-style one "
                         "(tiny_moe_llava/)")
    ap.add_argument("--steps", type=int, default=None, help="default: 1300 (deepseek), 550 (moe-llava)")
    ap.add_argument("--out", type=Path, default=None, help="default: moecache/data/tiny_moe[_llava]/")
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
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward (gradients accumulated over the batch); default: the whole batch")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.family]
    if args.out is None:
        args.out = DEFAULT_OUTS[args.family]
    if args.family == "moe-llava":
        return main_llava(args, argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    import transformers
    from transformers import DeepseekV2ForCausalLM

    t_start = time.perf_counter()
    d = load_data(args.seed)
    root, held, held_sources, val_windows = d["root"], d["held"], d["held_sources"], d["val_windows"]
    n_train_files, train_bytes, n_val_files, val_bytes = (d["n_train_files"], d["train_bytes"], d["n_val_files"],
                                                          d["val_bytes"])

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

    def evaluate() -> float:
        model.eval()
        balance.enabled = False
        vb = bits_per_byte(model, val_windows, args.batch)
        balance.enabled = True
        model.train()
        return vb

    history, train_s, final_train_loss = train_loop(model, args, d["train"], balance.pop, evaluate)


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



# ------------------------------------------------------------------ the MoE-LLaVA-style model
def llava_shape():
    """The tiny MoE-LLaVA-style shape: StableLM base (SwiGLU FFN, LayerNorm, q/k/v biases, 25% partial
    rotary), byte vocabulary, 4 layers with DeepSpeed-MoE (4 experts, top-2) on layers 0 and 2."""
    from moecache.models.llava import LanguageModelShape

    return LanguageModelShape("tiny-moe-llava", "stablelm", hidden=128, layers=4, heads=4, ffn=256,
                              vocab=VOCAB_SIZE, max_positions=512, num_experts=4, top_k=2, moe_every=2,
                              capacity_factor=1.5, eval_capacity_factor=1.0, min_capacity=4)


def _moe_layers(model) -> dict[int, torch.nn.Module]:
    """{decoder layer index: its MOELayer (mlp.deepspeed_moe)}."""
    return {i: layer.mlp.deepspeed_moe for i, layer in enumerate(model.model.layers)
            if hasattr(layer.mlp, "deepspeed_moe")}


def llava_config_dict(model, shape, aux_coef: float) -> dict:
    """config.json as MoE-LLaVA writes it (model_type moe_llava_stablelm, a "moe" section), what
    moecache.models.llava.load_language_model reads."""
    cfg = model.config.to_dict()
    cfg.update({
        "_name_or_path": shape.name, "architectures": ["MoELLaVAStablelmForCausalLM"],
        "model_type": "moe_llava_stablelm", "torch_dtype": "float16", "dtype": "float16",
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "use_cache": True,
        "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": shape.moe_layers, "ep_size": 1,
                "top_k_experts": shape.top_k, "capacity_factor": shape.capacity_factor,
                "eval_capacity_factor": shape.eval_capacity_factor, "min_capacity": shape.min_capacity,
                "use_residual": False, "router_aux_loss_coef": aux_coef,
                "num_experts": [shape.num_experts] * len(shape.moe_layers)},
    })
    return cfg


@torch.no_grad()
def llava_heldout_metrics(model, text: str, seed: int = 0, batch_size: int = 4) -> dict:
    """bits/byte on the held-out windows (eval mode: the config's eval capacity, drops counted over each
    batch of `batch_size` windows as DeepSpeed counts them; the global generator seeded for the top-2
    gate's Gumbel draws) and, per MoE layer, routing statistics of its gate on the same tokens."""
    win = text_windows(text)
    moes = _moe_layers(model)
    inputs = {i: [] for i in moes}
    kept = {i: [] for i in moes}
    handles = []

    def hook(i, args, out) -> None:
        inputs[i].append(args[0].detach())
        kept[i].append(out[1].sum(-1) > 0)

    for i, moe in moes.items():
        handles.append(moe.gate.register_forward_hook(lambda m, args, out, i=i: hook(i, args, out)))
    total, count = 0.0, 0
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for s in range(0, win.shape[0], batch_size):
                w = win[s:s + batch_size]
                logits = model(w, use_cache=False).logits[:, :-1]
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                                         reduction="sum").item()
                count += w[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
    n_win, n_pos = win.shape
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, moe in moes.items():
        x = torch.cat(inputs[i]).float()
        logits = x @ moe.gate.wg.weight.float().t()  # [S, E]
        n_exp = logits.shape[-1]
        top2 = logits.topk(2, dim=-1).indices  # the two largest router scores
        # The routes the gate takes when nothing is dropped (decode: one token, min_capacity): the first by
        # score, the second by score + Gumbel noise (DeepSpeed's top-2 sampling).
        u = torch.rand(logits.shape, generator=gen).clamp(1e-20, 1 - 1e-7)
        noisy = (logits - (-u.log()).log()).scatter(1, top2[:, :1], float("-inf"))
        sampled = torch.cat([top2[:, :1], noisy.argmax(-1, keepdim=True)], dim=1)
        kept_routes = torch.cat(kept[i])  # [S, E] the eval forward's kept routes
        stats = {"drop": 1 - kept_routes.sum().item() / (2 * kept_routes.shape[0])}
        for name, routes in (("top2", top2), ("sampled", sampled)):
            counts = torch.bincount(routes.reshape(-1), minlength=n_exp)
            pair = routes.sort(-1).values.view(n_win, n_pos, 2)
            same = (pair[:, 1:] == pair[:, :-1]).all(-1).float().mean().item()
            overlap = ((pair[:, 1:].unsqueeze(-1) == pair[:, :-1].unsqueeze(-2)).any(-1).sum(-1).float() / 2)
            top1 = routes[:, 0].view(n_win, n_pos)
            pair_id = pair[..., 0] * n_exp + pair[..., 1]
            pair_freq = torch.bincount(pair_id.reshape(-1), minlength=n_exp * n_exp).float() / pair_id.numel()
            top1_freq = torch.bincount(top1.reshape(-1), minlength=n_exp).float() / top1.numel()
            stats[name] = {"shares": (counts.float() / routes.numel()).tolist(),
                           "same_pair": same, "same_pair_chance": (pair_freq ** 2).sum().item(),
                           "overlap": overlap.mean().item(),
                           "same_top1": (top1[:, 1:] == top1[:, :-1]).float().mean().item(),
                           "same_top1_chance": (top1_freq ** 2).sum().item()}
        layers[i] = stats
    return {"bpb": total / count / math.log(2), "tokens": count, "windows": n_win, "layers": layers}


def main_llava(args, argv) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    import transformers
    from safetensors.torch import save_file

    from moecache.models.llava import build_language_model, load_language_model

    t_start = time.perf_counter()
    d = load_data(args.seed)
    held, val_windows = d["held"], d["val_windows"]
    shipped_held = DEFAULT_OUTS["deepseek"] / "heldout.txt"
    same_held = shipped_held.is_file() and shipped_held.read_text(encoding="utf-8") == held
    print(f"held-out sample {'equals' if same_held else 'DIFFERS from'} {shipped_held}", flush=True)

    shape = llava_shape()
    model = build_language_model(shape, seed=args.seed)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    moes = _moe_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".deepspeed_experts." in n)
    print(f"model: {n_params / 1e6:.3f}M parameters ({n_expert / 1e6:.3f}M in experts); MoE layers {list(moes)}",
          flush=True)
    group = args.micro_batch or args.batch  # windows per forward in evaluation too: one routing group, as in training
    init = llava_heldout_metrics(model.eval(), held, args.seed, group)  # random weights, for comparison
    print(f"random init: held-out {init['bpb']:.3f} bits/byte", flush=True)
    model.train()

    def aux_loss() -> torch.Tensor:  # MoE-LLaVA: the sum of the MoE layers' l_aux
        return torch.stack([moe.l_aux for moe in moes.values()]).sum()

    def evaluate() -> float:
        model.eval()
        with torch.random.fork_rng():  # the top-2 gate's Gumbel draws: seeded, and training's draws undisturbed
            torch.manual_seed(args.seed)
            vb = bits_per_byte(model, val_windows, group)
        model.train()
        return vb

    history, train_s, final_train_loss = train_loop(model, args, d["train"], aux_loss, evaluate)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    model.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llava_config_dict(model, shape, args.aux_coef), indent=2,
                                                sort_keys=True) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the files ship in the wheel
    # Measure what ships: the fp16 files loaded back, in fp32, by the local-checkpoint loader.
    shipped = load_language_model(out, dtype=torch.float32)
    assert [m.gate.eval_capacity_factor for m in _moe_layers(shipped).values()] == [shape.eval_capacity_factor] * 2
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        val_bpb = bits_per_byte(shipped, val_windows, group)
    hm = llava_heldout_metrics(shipped, held, args.seed, group)
    total_s = time.perf_counter() - t_start
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != "TRAINING.md"}
    print(f"shipped (fp16): validation {val_bpb:.4f} bits/byte; held-out sample {hm['bpb']:.4f} bits/byte", flush=True)
    for i, m in hm["layers"].items():
        print(f"layer {i}: dropped {m['drop']:.4f}; " + "; ".join(
            f"{k}: shares {[round(x, 3) for x in m[k]['shares']]}, same pair {m[k]['same_pair']:.3f} "
            f"(chance {m[k]['same_pair_chance']:.3f}), same top-1 {m[k]['same_top1']:.3f} "
            f"(chance {m[k]['same_top1_chance']:.3f})" for k in ("top2", "sampled")), flush=True)
    print(f"files: {sizes} = {sum(sizes.values()) / 1e6:.2f} MB; training {train_s:.0f} s, total {total_s:.0f} s",
          flush=True)
    write_llava_md(out, args, argv, shape, n_params, n_expert, train_s, total_s, final_train_loss, val_bpb, hm, init,
                   history, sizes, d, same_held, transformers.__version__)


def write_llava_md(out, args, argv, shape, n_params, n_expert, train_s, total_s, final_train_loss, val_bpb, hm, init,
                   history, sizes, d, same_held, tf_version) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python bench/train_tiny_moe.py", *argv])
    e = shape.num_experts

    def rows(metrics, kind):
        return "\n".join(
            f"| {i} | {' / '.join(f'{x:.3f}' for x in m[kind]['shares'])} | {m[kind]['same_pair']:.3f} | "
            f"{m[kind]['same_pair_chance']:.3f} | {m[kind]['overlap']:.3f} | {m[kind]['same_top1']:.3f} | "
            f"{m[kind]['same_top1_chance']:.3f} |" for i, m in metrics["layers"].items())

    header = ("| layer | share of routes, experts 0-3 | same pair as t-1 | chance | overlap with t-1 | "
              "same top-1 as t-1 | chance |\n| --- | --- | --- | --- | --- | --- | --- |")
    drops = ", ".join(f"layer {i} {m['drop']:.2%}" for i, m in hm["layers"].items())
    hist = "\n".join(f"| {s} | {tl:.4f} ({tl / math.log(2):.3f} bits/byte) | {vb:.4f} |" for s, tl, vb in history)
    files = "\n".join(f"| {name} | {size:,} |" for name, size in sizes.items())
    held_note = ("the same text as `../tiny_moe/heldout.txt` (same data, seed and split), so it is not stored "
                 "twice: `moecache.data.validation_text()` returns it" if same_held else
                 "NOT the same as `../tiny_moe/heldout.txt` (different data or seed)")
    text = f"""# tiny_moe_llava: how it was trained

A byte-level MoE-LLaVA-style language model (StableLM base, DeepSpeed-MoE layers as MoE-LLaVA builds
them) trained by this project so that its routers have learned structure (random-weight models route
without it). The files are a MoE-LLaVA checkpoint directory (config.json with model_type
`moe_llava_stablelm` and a `moe` section, fp16 safetensors under MoE-LLaVA's parameter names), loaded
by `moecache.models.llava.load_language_model(path)`; `moecache.data.load_tiny_moe_llava()` does that
for this directory. Held-out text: {held_note}.

- Command: `{cmd}` (from the repository root)
- Date: {_dt.date.today().isoformat()}; Python {platform.python_version()}, torch {torch.__version__}, transformers {tf_version}; CPU, fp32, {args.threads} thread
- Steps: {args.steps} x batch {args.batch} x {SEQ_LEN} bytes ({args.steps * args.batch * SEQ_LEN / 1e6:.1f}M tokens), forward in chunks of {args.micro_batch or args.batch} sequences (gradients accumulated; each chunk is one routing group for capacity); seed {args.seed}
- Wall time: training {train_s / 60:.1f} min ({train_s:.0f} s), whole script {total_s / 60:.1f} min
- Optimizer: AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr}, {args.warmup} warmup steps, cosine to {args.min_lr_ratio} x peak, grad-norm clip 1.0
- Loss: next-byte cross entropy + {args.aux_coef} x sum over the MoE layers of the gate's `l_aux` (DeepSpeed's top-2 balancing loss E^2 * mean_e(P_e * f_e), f_e = share of tokens whose first choice is e), read from each `MOELayer.l_aux` after the forward, as MoE-LLaVA adds it (router_aux_loss_coef {args.aux_coef})
- Capacity: training capacity_factor {shape.capacity_factor} (train mode), evaluation eval_capacity_factor {shape.eval_capacity_factor}, min_capacity {shape.min_capacity} (eval mode; what config.json says and the loader sets); DeepSpeed doubles the factor for top-2 and drops routes beyond an expert's capacity in token order
- Final train loss (mean of the last 50 steps): {final_train_loss:.4f} nats/byte = {final_train_loss / math.log(2):.3f} bits/byte
- Validation (128 windows of {SEQ_LEN} bytes from the validation files, batches of {args.micro_batch or args.batch}, shipped fp16 weights): **{val_bpb:.4f} bits/byte**
- Held-out sample (`validation_text()`, {hm['tokens']} bytes scored in {hm['windows']} windows of {SEQ_LEN}, batches of {args.micro_batch or args.batch} (each batch one routing group for capacity), global generator seeded {args.seed}): **{hm['bpb']:.4f} bits/byte** (uniform: 8; random init: {init['bpb']:.3f}); routes dropped by the eval capacity there: {drops}

## Model

StableLM (`transformers.StableLmForCausalLM` as `moecache.models.llava` configures it: LayerNorm, q/k/v
biases, partial rotary 0.25, SwiGLU FFN), hidden {shape.hidden}, {shape.layers} decoder layers, {shape.heads}
heads (head_dim {shape.hidden // shape.heads}), FFN intermediate {shape.ffn}; DeepSpeed-MoE on layers
{shape.moe_layers} (MoE-LLaVA's "sparse" mode, layers[::2]): {e} experts (each a SwiGLU FFN of
{shape.ffn}), top-{shape.top_k} (first expert by softmax score, second by score + Gumbel noise, as
DeepSpeed's top2gating samples it, also in eval), router `deepspeed_moe.gate.wg` Linear({shape.hidden}, {e});
the other layers dense. Vocabulary {shape.vocab} (bytes 0-255, BOS 256, EOS 257, PAD 258),
{shape.max_positions} positions, untied embeddings. {n_params:,} parameters ({n_expert:,} in experts);
stored in fp16.

| file | bytes |
| --- | --- |
{files}

Total {sum(sizes.values()) / 1e6:.2f} MB.

## Data

The same as `../tiny_moe/TRAINING.md`: the *.py sources of Python {platform.python_version()}'s standard library
(`{d['root']}`), split by file with seed {args.seed}: {d['n_train_files']} train files ({d['train_bytes'] / 1e6:.2f} MB),
{d['n_val_files']} validation files ({d['val_bytes'] / 1e6:.2f} MB); random {SEQ_LEN + 1}-byte crops of the train stream.

## Routing on the held-out sample (shipped weights)

Per MoE layer, over every held-out token: each expert's share of the routes, and temporal locality,
how often token t's expert pair (as a set) equals token t-1's in the same window ("chance" = the same
for independent tokens with these pair frequencies, sum over pairs of freq^2), the mean share of t's two
experts that t-1 also used, and the same for the top-1 expert.

"top2": the two largest router scores (what a deterministic replay would use):

{header}
{rows(hm, 'top2')}

"sampled": the routes the gate takes when nothing is dropped (decode; second expert by score + Gumbel
noise, seeded):

{header}
{rows(hm, 'sampled')}

For comparison, the same seed's random initial weights ("top2"):

{header}
{rows(init, 'top2')}

## Training curve

| step | train loss (last 50 steps) | validation bits/byte |
| --- | --- | --- |
{hist}
"""
    (out / "TRAINING.md").write_text(text, encoding="utf-8")

if __name__ == "__main__":
    main()
