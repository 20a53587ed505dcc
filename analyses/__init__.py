"""eemllm's analysis side: plans, FLOPs and latency, benchmarks, reports and the ``eemllm`` CLI."""
