"""`python -m moecache info|demo|plan` — all work on a machine with no GPU."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time

from ._env import backend_override, kv_block_size, log_level

log = logging.getLogger("moecache.cli")


def _info(_args) -> int:
    import torch

    import moecache
    from moecache import _C

    build = _C.build_info()
    lines = [
        ("moecache", moecache.__version__),
        ("moecache._C", f"{_C.__version__} ({os.path.dirname(_C.__file__)})"),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    try:
        import triton

        lines.append(("triton", triton.__version__))
    except ImportError as exc:
        lines.append(("triton", f"not importable ({exc})"))
    try:
        import transformers

        lines.append(("transformers", transformers.__version__))
    except ImportError:
        lines.append(("transformers", "not installed (needed only for moecache.patch)"))
    lines += [
        ("_C built with CUDA", f"{build['built_with_cuda']} (runtime {build['cuda_runtime_version']}, archs {build['cuda_archs'] or '-'})"),
        ("_C build", f"{build['build_type']}, {build['compiler']}" + (f", sanitizer {build['sanitizer']}" if build["sanitizer"] else "")),
        ("_C backend", _C.default_backend()),
        ("_C CUDA available", "yes" if _C.cuda_available() else f"no: {_C.cuda_unavailable_reason()}"),
        ("torch CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(("GPU", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}"))
    else:
        lines.append(("GPU", "none"))
    import moecache.kernels as kernels

    if kernels.INTERPRETING:
        mode = "interpreter (TRITON_INTERPRET=1, CPU)"
    elif torch.cuda.is_available():
        mode = "compiled (GPU)"
    else:
        mode = "compiled, but no GPU is usable: the Triton kernels cannot run (TRITON_INTERPRET=0 without a GPU)"
    lines.append(("Triton mode", mode))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


MOE_LLAVA_FAMILIES = ("moe-llava-phi2", "moe-llava-stablelm", "moe-llava-qwen")
DEMO_FAMILIES = ("deepseek_v2", "mixtral", "qwen3_moe", "trained", *MOE_LLAVA_FAMILIES)


def _demo_model(family: str, on_gpu: bool, layers: int | None):
    """A random-weight model: DeepSeek-V2 shaped like DeepSeek-VL2-Small's language model at full width
    (fewer layers) on a GPU, scaled down on CPU; or a Mixtral / Qwen3-MoE of matching size."""
    import torch
    import transformers

    if family == "trained":  # the small MoE this project trained (learned routing; moecache.data)
        from .data import load_tiny_moe

        return load_tiny_moe(device="cuda" if on_gpu else "cpu",
                             dtype=torch.bfloat16 if on_gpu else torch.float32)
    if family in MOE_LLAVA_FAMILIES:  # MoE-LLaVA's language model: DeepSpeed-MoE layers on every other layer
        from dataclasses import replace

        from .models.llava import SHAPES, build_language_model, scaled_down

        shape = SHAPES[family]
        shape = replace(shape, layers=layers or 8) if on_gpu else scaled_down(shape, layers=layers or 4)
        return build_language_model(shape, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                    device="cuda" if on_gpu else "cpu")
    if on_gpu:
        width = dict(vocab_size=102400, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                     max_position_embeddings=4096)
        moe = dict(n_routed=64, top_k=6, inter=1408, dense_inter=10944)
        layers = layers or 8
    else:
        width = dict(vocab_size=1024, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=512)
        moe = dict(n_routed=16, top_k=4, inter=176, dense_inter=704)
        layers = layers or 4
    if family == "deepseek_v2":
        rank = 512 if on_gpu else 64
        config = transformers.DeepseekV2Config(
            **width, num_hidden_layers=layers, intermediate_size=moe["dense_inter"], moe_intermediate_size=moe["inter"],
            n_routed_experts=moe["n_routed"], num_experts_per_tok=moe["top_k"], n_shared_experts=2,
            first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.0, kv_lora_rank=rank,
            q_lora_rank=None, qk_rope_head_dim=64 if on_gpu else 16, qk_nope_head_dim=128 if on_gpu else 32,
            v_head_dim=128 if on_gpu else 32)
        cls = transformers.DeepseekV2ForCausalLM
    elif family == "mixtral":
        config = transformers.MixtralConfig(**width, num_hidden_layers=layers, intermediate_size=moe["inter"],
                                            num_local_experts=moe["n_routed"], num_experts_per_tok=moe["top_k"])
        cls = transformers.MixtralForCausalLM
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**width, num_hidden_layers=layers, intermediate_size=moe["dense_inter"],
                                             moe_intermediate_size=moe["inter"], num_experts=moe["n_routed"],
                                             num_experts_per_tok=moe["top_k"], head_dim=128 if on_gpu else 64)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise SystemExit(f"--family must be one of {DEMO_FAMILIES}, got {family!r}")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    with torch.device("cuda" if on_gpu else "cpu"):
        model = cls(config).to(dtype).eval()
    return model


def _device_weight_bytes(model, device) -> int:

    import moecache

    total = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device.type)
    cache = moecache.expert_cache(model) if moecache.stats(model)["patched"] else None
    if cache is not None and cache.device.type == device.type:
        total += cache.num_slots * cache.record_bytes
    return total


def _kv_bytes_per_token(cache, tokens: int) -> float:
    """Bytes the generate cache holds per token (all layers): tensors it keeps, over the tokens stored."""
    import torch

    if hasattr(cache, "bytes_per_token"):  # moecache's latent cache: R + P values per token and layer
        return float(cache.bytes_per_token())
    held = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                held += t.numel() * t.element_size()
    return held / max(tokens, 1)


_PROMPT_STRIDE = 997  # tokens between the trained family's prompts: distinct stretches of the held-out text


def _demo(args) -> int:
    import torch

    import moecache
    from moecache.compat import output_cache

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    model = _demo_model(args.family, on_gpu, args.layers)
    from moecache.patching.families import find_experts

    if not find_experts(model):
        raise SystemExit(f"moecache demo: --layers {args.layers} leaves {args.family} without an MoE layer "
                         "(its first layers are dense); ask for more layers")
    cfg = model.config
    weights = "trained weights (moecache.data)" if args.family == "trained" else "random weights"
    print(f"{type(model).__name__}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {weights}, "
          f"{next(model.parameters()).dtype} on {device}; batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens")
    if args.family == "trained":  # held-out Python source, so routing is what the model learned
        from .data import encode, validation_text

        text = encode(validation_text())[0]
        if (args.batch - 1) * _PROMPT_STRIDE + args.prompt > text.numel():
            fits = (text.numel() - args.prompt) // _PROMPT_STRIDE + 1 if args.prompt <= text.numel() else 0
            raise SystemExit(f"moecache demo: --family trained takes its prompts from {text.numel()} tokens of "
                             f"held-out text, one every {_PROMPT_STRIDE}: --prompt {args.prompt} allows "
                             f"--batch {fits} at most")
        prompt = torch.stack([text[i * _PROMPT_STRIDE: i * _PROMPT_STRIDE + args.prompt]
                              for i in range(args.batch)]).to(device)
    else:
        prompt = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt), device=device,
                               generator=torch.Generator(device=device).manual_seed(1))

    def run(label):
        torch.manual_seed(0)  # DeepSpeed-MoE's top-2 gating draws noise: every run sees the same draws
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up / compile
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            stats_before = moecache.stats(model)["cache"] or {}
            start = time.perf_counter()
            result = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False, return_dict_in_generate=True)
            out = result.sequences
            if on_gpu:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        new = out[:, args.prompt:]
        model_stats = moecache.stats(model)
        cache = model_stats["cache"]
        hit = ""
        if cache:
            req = cache["requests"] - stats_before.get("requests", 0)
            hits = cache["hits"] - stats_before.get("hits", 0)
            hit = f"  expert hit rate {hits / max(req, 1):6.1%}"
        if model_stats.get("prediction"):
            recall = model_stats["prediction"]["by_depth"][1]["recall"]
            hit += f"  next-layer recall {recall:6.1%}" if recall is not None else "  next-layer recall    n/a"
        mem = f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB" if on_gpu else ""
        kv = _kv_bytes_per_token(output_cache(result), out.shape[0] * (out.shape[1] - 1))
        print(f"  {label:<28} {new.numel() / seconds:8.1f} tokens/s  weights on {device.type} "
              f"{_device_weight_bytes(model, device) / 2**30:6.2f} GiB  KV cache {kv / 1024:5.1f} KiB/token"
              f"{mem}{hit}")
        return new

    reference = run("unpatched (transformers)")
    moecache.patch(model)
    same = run("moecache, experts resident")
    moecache.unpatch(model)
    learned = None
    if args.family == "trained" and args.policy in ("predictive", "budgeted"):  # the shipped routing predictor
        from .data import TINY_MOE_DIR

        path = TINY_MOE_DIR / "route_predictor.pt"
        learned = str(path) if path.is_file() else None
    limit = None if args.policy != "budgeted" else (1.0 if args.prefetch_limit is None else args.prefetch_limit)
    moecache.patch(model, offload=moecache.Offload(gpu_experts=args.budget, policy=args.policy, predictor=learned,
                                                   prefetch_limit=limit))
    offloaded = run(f"moecache, offload {args.budget}")
    moecache.unpatch(model)
    for label, tokens in (("resident", same), ("offload", offloaded)):
        match = (tokens == reference).float().mean().item()
        print(f"  tokens identical to unpatched ({label}): {match:.1%}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return value


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _plan(args) -> int:
    import json

    import torch

    from . import compat
    from .patching import Offload, plan
    from .patching.offload import gpu_experts_from_text

    model = compat.model_on_meta(args.path)
    offload = None if args.gpu_experts is None else Offload(gpu_experts=gpu_experts_from_text(args.gpu_experts),
                                                             policy=args.policy)
    result = plan(model, offload=offload)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    config = getattr(model, "config", None)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    print(f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r}), {str(dtype).replace('torch.', '')}: "
          f"{_gib(result['parameter_bytes'])} of weights, {_gib(result['expert_parameter_bytes'])} of them in the experts "
          "moecache would run")
    layers = result["experts"]
    kinds = sorted({(layer["type"], layer["experts"], layer["activation"], layer["gated"], layer["expert_bytes"])
                    for layer in layers})
    for key in kinds:
        kind, count, activation, gated, record = key
        names = [layer["name"] for layer in layers
                 if (layer["type"], layer["experts"], layer["activation"], layer["gated"], layer["expert_bytes"]) == key]
        print(f"experts: {len(names)} layers of {count} {kind} ({activation}, {'gated' if gated else 'not gated'}; "
              f"{record / 2**20:.2f} MiB each), {names[0]}{' ...' if len(names) > 1 else ''}")
    if not layers:
        print("experts: none moecache would run")
    print(f"MLA attention: {len(result['attention'])} modules" if result["attention"] else "MLA attention: none")
    for item in result["left_alone"]:
        print(f"left alone: {item['name']} ({item['type']}): {item['reason']}")
    if offload is not None:
        o = result["offload"]
        print(f"offload gpu_experts={args.gpu_experts}, policy {args.policy}: {o['slots']} device slots ({o['slots_per_layer']:.1f} per layer, "
              f"{_gib(o['slot_bytes'])}); host store {_gib(o['host_bytes'])}; weights on the device "
              f"{_gib(o['device_weight_bytes'])} (without activations and the KV cache)")
        if o["resident"]:
            print(f"offload: experts of another shape stay on the device (one expert cache takes one shape): "
                  f"{len(o['resident'])} layers, {o['resident'][0]}{' ...' if len(o['resident']) > 1 else ''}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moecache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build flags, CUDA and Triton status")
    demo = sub.add_parser("demo", help="generate with a random-weight MoE model, unpatched vs patched vs offloaded")
    demo.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    demo.add_argument("--family", default="deepseek_v2", choices=DEMO_FAMILIES,
                      help="deepseek_v2 (VL2-Small's LM shape), mixtral, qwen3_moe, trained (the shipped small "
                           "MoE with learned routing), or a MoE-LLaVA language model (DeepSpeed-MoE layers; full "
                           "width on a GPU, scaled down on CPU)")
    demo.add_argument("--layers", type=_positive_int, default=None, help="decoder layers (default: 8 on a GPU, 4 on CPU)")
    demo.add_argument("--budget", type=_fraction, default=0.25, help="fraction of experts kept on the device")
    demo.add_argument("--policy", default="predictive", choices=("lru", "lfu", "predictive", "budgeted"),
                      help="predictive: lookahead gating (the learned predictor with --family trained); budgeted: "
                           "predictive within a copy allowance (--prefetch-limit)")
    demo.add_argument("--prefetch-limit", type=_non_negative, default=None,
                      help="with --policy budgeted: experts copied ahead per layer of compute (default 1)")
    demo.add_argument("--batch", type=_positive_int, default=1)
    demo.add_argument("--prompt", type=_positive_int, default=16, help="prompt tokens")
    demo.add_argument("--new-tokens", type=_positive_int, default=24)
    plan_cmd = sub.add_parser("plan", help="what moecache.patch would do to a checkpoint folder's model, and the memory "
                              "an offload budget takes, from its config.json alone (no weights read)")
    plan_cmd.add_argument("path", help="a folder holding the model's config.json (a local checkpoint)")
    plan_cmd.add_argument("--gpu-experts", default=None,
                          help="an offload budget as Offload(gpu_experts=...) takes it: a fraction (0.25), a count "
                               "per layer (4) or a size (6GiB)")
    plan_cmd.add_argument("--policy", default="lru", choices=("lru", "lfu", "predictive"),
                          help="with --gpu-experts: the offload policy (predictive needs each MoE layer's router)")
    plan_cmd.add_argument("--json", action="store_true", help="print moecache.plan's dict as JSON")
    args = parser.parse_args(argv)
    if args.command == "demo" and args.prefetch_limit is not None and args.policy != "budgeted":
        parser.error(f"argument --prefetch-limit: applies to --policy budgeted, not {args.policy}")
    if args.command == "demo" and args.layers is not None and args.family == "trained":
        parser.error("argument --layers: the trained model's depth is fixed (it ships with its weights)")
    if args.command == "demo":  # read by the patched runs: a bad value fails here, not after the first run
        try:
            backend_override()
            kv_block_size()
        except ValueError as exc:
            parser.error(str(exc))
    logging.basicConfig(level=log_level() or "WARNING", stream=sys.stderr)
    if args.command == "plan" and args.policy != "lru" and args.gpu_experts is None:
        parser.error("argument --policy: applies with --gpu-experts")
    if args.command == "plan":
        try:
            return _plan(args)
        except (OSError, ValueError) as exc:  # no config.json there, a model transformers lacks, a bad budget
            print(f"moecache plan: {exc}", file=sys.stderr)
            return 2
    return {"info": _info, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
