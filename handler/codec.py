"""What every wire format's codec does for the predictor: decode a batch of its requests, encode answers.

One implementation per wire format (:class:`~handler.json_rows.RequestDecoder` for the JSON
rows, :class:`~handler.oip.OipCodec` for the Open Inference Protocol). The predictor finds each
request's format, hands every codec its requests, runs the decoded rows of all formats in one
forward pass and has each codec answer its own; it never sees a format's bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import orjson

from handler.errors import ErrorKind, InvalidRequest
from handler.rows import FeatureRows
from handler.torchserve import Request

JSON = "application/json"
INTERNAL_ERROR = orjson.dumps({"code": 500, "type": "internal_error", "message": "the server failed; see its log"})


@dataclass(frozen=True)
class Response:
    """One request's answer: HTTP status, body, content type, headers, and the error kind of a refusal."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    error_kind: ErrorKind | None = None


class Received(NamedTuple):
    """A request of a batch whose wire format is known: its position in the batch, the request, and its body as its
    codec takes it (the parsed JSON value where telling the format took parsing it, else as received).

    A named tuple: one is made for every request, and a frozen dataclass takes three times as long to make.
    """

    position: int
    request: Request
    body: Any


class Decoded(Protocol):
    """A decoded request: its model rows and, for a ranking request, the context row they share."""

    @property
    def rows(self) -> FeatureRows: ...

    @property
    def context(self) -> FeatureRows | None: ...

    @property
    def num_rows(self) -> int: ...


D = TypeVar("D", bound=Decoded)


class Codec(Protocol[D]):
    """One wire format: its requests decoded to rows (bad input: :class:`InvalidRequest`), its answers encoded."""

    def decodes_together(self, received: Received) -> bool:
        """Whether this request waits to be decoded with the batch's others of its format (cheaper together)
        rather than at once (its decoded body then dropped before the next one is parsed)."""
        ...

    def decode_batch(self, batch: Sequence[Received]) -> list[D | InvalidRequest]:
        """Each request decoded, or its error in its place."""
        ...

    def encode(self, decoded: D, logits: np.ndarray, scores: np.ndarray) -> Response:
        """The answer to a decoded request: its rows' logits and click probabilities."""
        ...

    def encode_error(self, error: InvalidRequest, request: Request) -> Response:
        """The answer to a refused request."""
        ...
