"""Client for the DLRM served over the Open Inference Protocol; see :mod:`dlrm_client.client`."""

from dlrm_client.client import DLRMClient, DLRMRequestError, Prediction

__all__ = ["DLRMClient", "DLRMRequestError", "Prediction"]
