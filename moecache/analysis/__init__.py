"""Analysis tools, apart from the runtime (which never imports them): routing traces, the cache
simulator with Belady's bound, the multimodal prompt workloads of the study, and layer costs."""
