"""Benchmarks of tierflow components (run by bench/ scripts and the CLI)."""
