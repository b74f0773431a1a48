"""Benchmarking: machine description, Spec-Bench-style harness, metrics, reports."""
