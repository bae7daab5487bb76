"""Benchmarks: scripts that print tables and write JSON to bench/results/, and the load generator."""
