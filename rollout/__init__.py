"""Model updates without downtime: publish a gated new version to a running TorchServe, or roll back."""
