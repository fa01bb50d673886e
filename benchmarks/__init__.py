"""asyncckpt benchmarks: ``python -m benchmarks`` (``--smoke`` for a seconds-long run)."""
