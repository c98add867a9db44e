"""Support code of the benchmarks and the GPU report (scripts/gpu_report.py); training never imports it.

Importing this package imports nothing else: `fastcifar.bench.benchreport` must stay importable
without torch (the GPU report's parent process and the test conftests ask it about CUDA first).
"""
