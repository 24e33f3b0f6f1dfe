"""Operational helpers shared by the Makefile, tests and benchmarks."""
