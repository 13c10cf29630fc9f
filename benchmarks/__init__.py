"""Benchmarks and the grounding benchmark generator: run from a checkout, never installed with the package."""
