"""eemllm's analyses, grouped by the stage of the flow they serve: ``choosing`` (plans from probe
results, held-out checks), ``measuring`` (token counts, FLOPs, latency, benchmark scripts),
``evaluating`` (answers and metrics on data sets, lmms-eval), ``reporting`` (the redundancy
report); ``demo`` and ``cli`` (the ``eemllm`` command) are the faces over them."""
