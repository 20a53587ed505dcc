"""Measuring plans: token counts, FLOPs, latency and memory, and the benchmark scripts
(``python -m analyses.measuring.bench_modes``, ``bench_probes``, ``bench_stability``, ``gpu_check``)."""
