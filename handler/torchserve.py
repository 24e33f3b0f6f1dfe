"""What this handler assumes about TorchServe 0.12's internals on the worker's side, in one place.

TorchServe tells a handler nothing about how a request reached it. These conventions of
TorchServe 0.12.0 tell it instead; each is listed, with the TorchServe source it relies on and the
test that guards it, in docs/torchserve-internals.md:

- its REST inference routes add an ``explain`` header to every request, and ``/predictions``
  also ``url_path``: ``explain`` alone means ``POST /v2/models/{m}/infer``, the Open Inference
  Protocol;
- its OIP gRPC service (``ModelInfer``) hands over a request with no header at all, where an HTTP
  request with a body always has some, and turns whatever the handler answers into a
  ``ModelInferResponse`` (an error too, so that one is sent as an ``error`` output);
- its describe request (``GET /models/{m}?customized=true``) comes alone, marked ``describe:
  True``, and every client header is copied into an inference request (so a client can send
  ``describe`` too);
- the request body is the ``body`` or ``data`` entry of the worker's request dict.

:func:`check_version` warns in the worker log when the installed TorchServe is not the version
these were verified on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import orjson

# The TorchServe release whose internals these conventions were read from.
VERIFIED_VERSION = "0.12.0"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One request's body and HTTP headers (names lower-cased), as TorchServe hands them to a worker.

    ``grpc``: it came through TorchServe's OIP gRPC service (``ModelInfer``).
    """

    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    grpc: bool = False

    @property
    def oip_route(self) -> bool:
        """It came by an Open Inference Protocol route: gRPC ``ModelInfer`` or ``POST /v2/models/{m}/infer``."""
        return self.grpc or ("explain" in self.headers and "url_path" not in self.headers)

    @property
    def is_describe(self) -> bool:
        """TorchServe's describe request (``GET /models/{m}?customized=true``, management API only).

        TorchServe marks it with a ``describe: True`` header, but it also copies every
        client header into an inference request: an inference request is told apart
        by the ``explain`` header that TorchServe adds to every one of its REST
        inference routes (gRPC requests have no headers at all).
        """
        return self.headers.get("describe") == "True" and "explain" not in self.headers and not self.grpc


def request_of(context: Any, index: int, data: Mapping[str, Any]) -> Request:
    """One request of the batch with its HTTP headers, names lower-cased (TorchServe keeps the client's spelling).

    TorchServe's gRPC service passes no HTTP header at all, where an HTTP request
    with a body always has some (``Content-Length`` at least).
    """
    headers = {
        name.lower(): value for name, value in context.get_all_request_header(index).items() if isinstance(value, str)
    }
    return Request(request_body(data), headers, grpc=not headers)


def request_body(data: Mapping[str, Any]) -> Any:
    """The body of one TorchServe request: raw bytes, or a value TorchServe already decoded."""
    for key in ("body", "data"):
        if data.get(key) is not None:
            return data[key]
    return None


def grpc_error(body: Mapping[str, Any], model_name: str, model_version: str) -> bytes:
    """An error body as a ``ModelInferResponse`` that TorchServe 0.12 can convert: the body as an ``error`` output.

    TorchServe's gRPC service turns every answer of the handler into a
    ``ModelInferResponse`` whatever its status, and fails on one without
    ``id``, ``model_name``, ``model_version`` and ``outputs``. It writes each BYTES element
    as its JSON text: the error object goes as it is, encoded once.
    """
    error_output = {"name": "error", "datatype": "BYTES", "shape": [1], "data": [body]}
    return orjson.dumps({"model_name": model_name, "model_version": model_version, "id": "", "outputs": [error_output]})


def check_version(installed: str | None = None) -> bool:
    """Whether the installed TorchServe (or ``installed``) is the version these conventions were verified on;
    a WARNING in the worker log when it is not: requests may then be routed or answered wrongly."""
    if installed is None:
        try:
            installed = metadata.version("torchserve")
        except metadata.PackageNotFoundError:
            installed = "not installed"
    if installed == VERIFIED_VERSION:
        logger.info("TorchServe %s: the version this handler's TorchServe conventions were verified on", installed)
        return True
    logger.warning(
        "TorchServe %s: this handler relies on TorchServe %s's internals (docs/torchserve-internals.md); "
        "check each of them before serving with this version",
        installed,
        VERIFIED_VERSION,
    )
    return False
