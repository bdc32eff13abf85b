"""Runs vLLM (offline, CPU, one process) on tiny local models and prints what it generated, as JSON.

tests/test_vllm.py starts this in a subprocess for each plugin setting, because vLLM loads its plugins once
per process. Usage: python vllm_runs.py SPEC.json, where SPEC holds "prompts", "max_tokens" and "runs":
a list of {"name", "model", "env": {...}, "enforce_eager": bool, "zero_moe": bool, "tensor_parallel_size": int,
"enable_expert_parallel": bool};
each run's env is applied before its engine is built (MOECACHE_VLLM itself is read once, when vLLM loads the
plugin). With tensor parallelism the ranks are worker processes: their moecache state is not seen here.
"""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: the plugin state is here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from moecache.integrations import vllm as backend

    results = {"registered": sorted(op_registry_oot), "method": None, "runs": {}}
    cls = backend.method_class()
    if cls is not None:
        results["method"] = f"{cls.__module__}.{cls.__qualname__}"
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], detokenize=False, ignore_eos=True)
    for run in spec["runs"]:
        for key in ("MOECACHE_VLLM_OFFLOAD", "MOECACHE_VLLM_POLICY", "MOECACHE_VLLM_LOOKAHEAD",
                    "MOECACHE_VLLM_PREFETCH_LIMIT"):
            os.environ.pop(key, None)
        os.environ.update(run.get("env", {}))
        original_apply = cls.apply if cls is not None else None
        if run.get("zero_moe"):
            # Negative control: if vLLM used its own experts, zeroing moecache's output would change nothing.
            cls.apply = lambda self, layer, x, *args, **kwargs: torch.zeros_like(x)
        out = {}
        try:
            tp = run.get("tensor_parallel_size", 1)
            llm = LLM(model=run["model"], skip_tokenizer_init=True, dtype="float32", max_model_len=128,
                      enforce_eager=run.get("enforce_eager", True), seed=0, tensor_parallel_size=tp,
                      distributed_executor_backend="mp" if tp > 1 else None,
                      enable_expert_parallel=run.get("enable_expert_parallel", False))
            generated = llm.generate(prompts, params, use_tqdm=False)
            out["tokens"] = [list(g.outputs[0].token_ids) for g in generated]
            out["stats"] = backend.stats() if cls is not None else None
            del llm
        except Exception as exc:  # reported to the test, which checks the message
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if original_apply is not None:
                cls.apply = original_apply
        results["runs"][run["name"]] = out
    print("VLLM_RUNS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
