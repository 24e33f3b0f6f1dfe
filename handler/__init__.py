"""TorchServe handler for the DLRM: a thin handler over a plain request codec."""
