"""Benchmarks on exports and live models: lm-evaluation-harness tasks and clip_benchmark sets, offline."""
