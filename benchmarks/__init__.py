"""privrec benchmarks: ``make bench`` (``python -m benchmarks.run``); results in BENCHMARKS.md."""
