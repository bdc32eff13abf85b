"""Models moecache builds itself, without downloads: DeepSpeed-MoE's layer structure for single-process
inference, and the MoE-LLaVA / LLaVA-1.5 language models of the throughput study."""
