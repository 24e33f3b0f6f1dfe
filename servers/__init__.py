"""Real TorchServe and nginx processes on loopback ports, and client load, for `make serve`, tests and benchmarks."""
