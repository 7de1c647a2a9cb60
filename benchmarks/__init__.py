"""Benchmarks of the kc-keras pipeline; results go to benchmarks/results/."""
