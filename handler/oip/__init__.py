"""The Open Inference Protocol (KServe v2) for the DLRM: tensors in, ``score`` and ``logit`` out.

TorchServe 0.12 routes ``POST /v2/models/{model}/infer`` (REST) and gRPC
``ModelInfer`` to the handler; the gRPC service hands over the request as the
same JSON, built from the typed ``contents``. One request is columnar:

==================  ===============  ==================  ==========================================
input               datatype         shape               what
==================  ===============  ==================  ==========================================
``dense_features``  FP32             ``[N, 13]``         dense features, transformed as in training
``sparse_lengths``  INT32 or INT64   ``[N, 26]``         ids per row and feature (0 and >1 allowed)
``sparse_ids``      INT64            ``[total]``         the ids, row-major: row 0's ``cat_0`` ids,
                                                         its ``cat_1`` ids, ..., then row 1's
``int_features``    BYTES            ``[N, 13]``         raw Criteo rows instead: decimal integers,
``cat_features``    BYTES            ``[N, 26]``         8 hex digits; ``""`` is missing
==================  ===============  ==================  ==========================================

A ranking request (one user, ``N`` candidates) adds a context row beside the model
inputs: ``context_sparse_lengths`` (INT32 or INT64 ``[1, 26]``) and
``context_sparse_ids`` (INT64 ``[total]``), the features whose ids all candidates
share, looked up once. The candidates' ``sparse_lengths`` are either ``[N, 26]``
(0 where the context has ids: ids on both sides are refused) or, compact,
``[N, m]``: only the ``m`` features the context has no ids for, in schema order.
The dense features come either per candidate (``dense_features``) or once, as
``context_dense_features`` (FP32 ``[1, 13]``), copied into every row.

Outputs ``score`` (click probability) and ``logit``, FP32 ``[N]``: both unless
the request's ``outputs`` names some; as raw bytes when the request asks
(``"parameters": {"binary_data_output": true}``, or ``binary_data`` per output).
Tensors travel as JSON ``data`` or, with the binary data extension, as raw
little-endian bytes after a JSON header whose length the
``Inference-Header-Content-Length`` header gives (``binary_data_size`` per input).

Errors are the JSON rows' error bodies with OIP's ``error`` key first.

``schema`` holds the names and datatypes, ``wire`` reads a body's tensors, ``tensors`` turns
them into rows, ``responses`` encodes answers, and ``codec`` is the one entry point.
"""

from handler.oip.codec import OipCodec, OipRequest
from handler.oip.schema import (
    DENSE_INPUT,
    HEADER_LENGTH,
    IDS_INPUT,
    LENGTHS_INPUT,
    METADATA_FILE,
    RAW_CATEGORIES_INPUT,
    RAW_INTS_INPUT,
    model_metadata,
)

__all__ = [
    "DENSE_INPUT",
    "HEADER_LENGTH",
    "IDS_INPUT",
    "LENGTHS_INPUT",
    "METADATA_FILE",
    "RAW_CATEGORIES_INPUT",
    "RAW_INTS_INPUT",
    "OipCodec",
    "OipRequest",
    "model_metadata",
]
