"""The Open Inference Protocol's codec: a request's body → its rows and the outputs it wants; answers encoded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from handler import torchserve
from handler.codec import Received, Response
from handler.errors import ErrorKind, InvalidRequest, wrong_json_type
from handler.oip.responses import OutputRequest, encode, output_request
from handler.oip.schema import HEADER_LENGTH, TOP_LEVEL_KEYS
from handler.oip.tensors import TensorRows
from handler.oip.wire import TensorReader, split_body, wrong_type
from handler.rows import FeatureRows, RowValidator
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing


@dataclass(frozen=True)
class OipRequest:
    """The rows of one OIP request, and how to answer it; ``context``: a ranking request's shared row."""

    id: str
    rows: FeatureRows
    outputs: OutputRequest
    context: FeatureRows | None = None

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows


class OipCodec:
    """Decodes OIP requests into validated rows and encodes scores as OIP responses, for one model.

    ``name`` and ``version`` are echoed in every response.
    """

    def __init__(
        self, config: DLRMConfig, preprocessing: Preprocessing, validator: RowValidator, name: str, version: str
    ) -> None:
        self.validator = validator
        self.reader = TensorReader(config, validator)
        self.tensor_rows = TensorRows(config, preprocessing, validator)
        self.name = name
        self.version = version

    # ------------------------------------------------------------------ the codec

    def decodes_together(self, received: Received) -> bool:
        return False

    def decode_batch(self, batch: Sequence[Received]) -> list[OipRequest | InvalidRequest]:
        """Each request decoded alone (its body parsed already when it came by ``/predictions``)."""
        results: list[OipRequest | InvalidRequest] = []
        for received in batch:
            request = received.request
            try:
                results.append(self.decode(received.body, request.headers.get(HEADER_LENGTH), request.grpc))
            except InvalidRequest as error:
                results.append(error)
        return results

    def encode(self, request: OipRequest, logits: np.ndarray, scores: np.ndarray) -> Response:
        """The OIP response: JSON tensors, or a JSON header followed by the binary ones."""
        header = {"model_name": self.name, "model_version": self.version, "id": request.id}
        return encode(header, request.outputs, logits, scores)

    def encode_error(self, error: InvalidRequest, request: torchserve.Request) -> Response:
        """The error body with OIP's ``error`` key; over gRPC, as the ``error`` output TorchServe 0.12 needs."""
        body = error.to_body(oip=True)
        encoded = torchserve.grpc_error(body, self.name, self.version) if request.grpc else orjson.dumps(body)
        return Response(error.status, encoded, error_kind=error.kind)

    # ------------------------------------------------------------------ requests

    def decode(
        self, body: bytes | bytearray | dict | None, header_length: str | None = None, grpc: bool = False
    ) -> OipRequest:
        """One request: a JSON body, an already-parsed one, or a binary-extension body with its header length.

        ``grpc``: TorchServe's gRPC service handed it over, BYTES elements base64-encoded.
        """
        payload, binary = split_body(body, header_length, self.validator)
        if not isinstance(payload, dict):
            raise wrong_json_type(
                "an inference request must be a JSON object", payload, "object", kind=ErrorKind.INVALID_BODY
            )
        unknown = sorted(payload.keys() - TOP_LEVEL_KEYS)
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"unknown key {unknown[0]!r} in the request; it has {sorted(TOP_LEVEL_KEYS)}",
                field=unknown[0],
            )
        request_id = payload.get("id", "")
        if not isinstance(request_id, str):
            raise wrong_type("id", "string", request_id)
        tensors = self.reader.tensors(payload.get("inputs"), binary, grpc)
        outputs = output_request(payload.get("parameters"), payload.get("outputs"))
        rows, context = self.tensor_rows.rows(tensors)
        return OipRequest(id=request_id, rows=rows, outputs=outputs, context=context)
