"""Experiments built on the library: one method end to end (runner), timing, the demo, the study, benchmarks and
the synthetic dataset. Nothing in the library imports this package."""
