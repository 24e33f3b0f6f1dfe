"""The JSON row formats of ``POST /predictions/dlrm``: decode, validate, encode.

Plain Python and NumPy, no TorchServe: the predictor calls it, unit tests call it
directly. The shared rules (finite values, lengths, id ranges, ranking requests) are
:class:`~handler.rows.RowValidator`'s; this package checks what only JSON rows can get
wrong (types, keys, counts per row): ``codec`` tells a body's form and encodes answers,
``reference``, ``raw``, ``ranking`` and ``columns`` decode one form each, ``request``
holds what they share.

Request bodies (JSON):

- one row, the pytorch/serve ``torchrec_dlrm`` format::

    {"float_features": [13 numbers],
     "id_list_features.lengths": [26 ints >= 0],
     "id_list_features.values": [sum(lengths) ints]}

  ``values`` lists the ids of feature 0, then feature 1, ...; each id is a row
  index in ``[0, num_embeddings)`` of its feature's table.
- one raw Criteo row, keyed by the schema's names, as logged before any
  preprocessing: ``{"int_0": 5, ..., "int_12": 0, "cat_0": "05db9164", ...,
  "cat_25": "c0d61a5c"}``; integers or null, 8-hex-digit strings or null/empty;
  an absent key means missing. It goes through the archive's
  :class:`~model_factory.features.Preprocessing`, exactly as in training.
- several rows: ``{"instances": [row, ...]}`` (all rows in the format of the first).
- a ranking request, one user and ``N`` candidates in raw Criteo rows:
  ``{"context": {features shared by all rows}, "instances": [{the other features}, ...]}``;
  a feature is given in the context or in the candidates, never in both; absent from
  both (or null), it is missing, as in a plain raw row. The context's sparse ids are
  looked up once for all candidates (:attr:`RowsRequest.context`); its dense values are
  copied into every row, since the dense MLP takes all dense features together. Scores as
  for ``instances``.
- a ranking request in the reference format, by the OIP ranking request's rules:
  ``{"context": {"id_list_features.lengths": [26], "id_list_features.values": [...]},
  "instances": [{"float_features": [13], "id_list_features.lengths": [m or 26], ...}]}``;
  the context's features are those of context length > 0, a candidate's lengths cover
  the other ``m`` features (or all 26, 0 for the context's); ``float_features`` in the
  context or in every candidate.

- columnar, TF Serving's ``inputs`` form of ``instances``: ``{"inputs": {field: [its value
  in row 0, row 1, ...]}}``, every field of the row format an array of one value per row
  (all of the same length), optionally beside a ranking ``context``. It saves repeating
  every key in every row. Raw Criteo columns take a fast path straight to arrays;
  anything else (the reference format's fields, or a problem to name) is decoded as the
  rows it transposes to, so each rule and error is the row format's (row ``i`` is
  position ``i`` of the columns).

Responses: ``{"score": p, "logit": z}`` for one row, ``{"predictions": [...]}``
in request order for ``instances``, ``{"outputs": {"score": [...], "logit": [...]}}``
for ``inputs`` (columnar in, columnar out, as TF Serving answers). Invalid input raises
:class:`~handler.errors.InvalidRequest`, which carries the HTTP status and a JSON
body naming the field, the row, what was expected and what was received.
Nothing is coerced: ids must be JSON integers (never floats or strings), dense
values finite numbers.
"""

from handler.json_rows.codec import RequestDecoder, encode_error, encode_scores
from handler.json_rows.request import RowsRequest

__all__ = ["RequestDecoder", "RowsRequest", "encode_error", "encode_scores"]
