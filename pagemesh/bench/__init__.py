"""Benchmarks: `pagemesh bench throughput` (offline LLM API) and the peer comparison (`make bench`)."""
