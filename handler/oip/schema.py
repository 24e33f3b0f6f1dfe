"""This model's Open Inference Protocol contract: input and output names, their datatypes, and its metadata.

The frontend agent (``frontend_agent/``) answers the model metadata route from
:func:`model_metadata`, written into every archive as :data:`METADATA_FILE`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handler.rows import FieldNames
from handler.values import INT_TYPES, NUMBER_TYPES, STRING_TYPES
from model_factory.config import DLRMConfig

DENSE_INPUT = "dense_features"
LENGTHS_INPUT = "sparse_lengths"
IDS_INPUT = "sparse_ids"
RAW_INTS_INPUT = "int_features"
RAW_CATEGORIES_INPUT = "cat_features"
CONTEXT_DENSE_INPUT = "context_dense_features"
CONTEXT_LENGTHS_INPUT = "context_sparse_lengths"
CONTEXT_IDS_INPUT = "context_sparse_ids"
MODEL_INPUTS = (DENSE_INPUT, LENGTHS_INPUT, IDS_INPUT)
RAW_INPUTS = (RAW_INTS_INPUT, RAW_CATEGORIES_INPUT)
CONTEXT_INPUTS = (CONTEXT_DENSE_INPUT, CONTEXT_LENGTHS_INPUT, CONTEXT_IDS_INPUT)
SCORE_OUTPUT = "score"
LOGIT_OUTPUT = "logit"
OUTPUTS = (SCORE_OUTPUT, LOGIT_OUTPUT)
FIELD_NAMES = FieldNames(dense=DENSE_INPUT, lengths=LENGTHS_INPUT, values=IDS_INPUT)
CONTEXT_FIELD_NAMES = FieldNames(dense=CONTEXT_DENSE_INPUT, lengths=CONTEXT_LENGTHS_INPUT, values=CONTEXT_IDS_INPUT)
# Written into every archive by build_mar.py, answered by the frontend agent (frontend_agent/).
METADATA_FILE = "oip-metadata.json"
PLATFORM = "pytorch_torchrec"

# The binary data extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "inference-header-content-length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# The datatypes each input accepts, the widest last.
ALLOWED_DATATYPES = {
    DENSE_INPUT: ("FP32",),
    LENGTHS_INPUT: ("INT32", "INT64"),
    IDS_INPUT: ("INT64",),
    RAW_INTS_INPUT: ("BYTES",),
    RAW_CATEGORIES_INPUT: ("BYTES",),
    CONTEXT_DENSE_INPUT: ("FP32",),
    CONTEXT_LENGTHS_INPUT: ("INT32", "INT64"),
    CONTEXT_IDS_INPUT: ("INT64",),
}
# Little-endian element types of the numeric datatypes; BYTES elements are length-prefixed.
NUMPY_TYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
# The JSON types of each datatype's ``data`` elements, and what an error calls them.
JSON_TYPES: dict[str, tuple[frozenset[type], str]] = {
    "FP32": (NUMBER_TYPES, "number"),
    "INT32": (INT_TYPES, "integer"),
    "INT64": (INT_TYPES, "integer"),
    "BYTES": (STRING_TYPES, "string"),
}
# model_name and model_version: TorchServe's gRPC service adds them to the JSON it hands over.
TOP_LEVEL_KEYS = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
TENSOR_KEYS = frozenset({"name", "datatype", "shape", "parameters", "data"})


def model_metadata(config: DLRMConfig) -> dict[str, Any]:
    """The tensors of OIP model metadata (``GET /v2/models/{m}``); the frontend agent adds name and versions.

    It lists the columnar inputs, each with its widest datatype: the protocol's metadata
    cannot say "these inputs, or else the raw-row ones", so those are documented instead.
    """
    shapes = {
        DENSE_INPUT: [-1, config.num_dense_features],
        LENGTHS_INPUT: [-1, config.num_sparse_features],
        IDS_INPUT: [-1],
    }
    return {
        "platform": PLATFORM,
        "inputs": [
            {"name": name, "datatype": ALLOWED_DATATYPES[name][-1], "shape": shapes[name]} for name in MODEL_INPUTS
        ],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1]} for name in OUTPUTS],
    }
