"""Benchmarks of the DLRM serving path: in-process, through TorchServe, and against a no-op handler."""
