"""Ranking requests in JSON: one context and ``N`` candidates, in raw Criteo rows or in the reference format.

- Raw rows: ``{"context": {features shared by all rows}, "instances": [{the other features}, ...]}``;
  a feature is given in the context or in the candidates, never in both; absent from both, it is
  missing (as in a plain raw row, where an absent key is a missing value).
- The reference format, by the OIP ranking request's rules: the context holds
  ``float_features``, or ``id_list_features.lengths`` (all 26) with their ids (its features
  are those of length > 0), or all three; each candidate holds its ``float_features`` unless
  the context does, and its lengths over the other features only (compact) or over all 26
  (0 for the context's).

The context's sparse ids are looked up once for all candidates (:attr:`RowsRequest.context`); its
dense values are copied into every row, since the dense MLP takes all dense features together.
Errors in the context are named ``context:`` instead of a row.
"""

from __future__ import annotations

import numpy as np

from handler import values
from handler.errors import ErrorKind, InvalidRequest, wrong_json_type
from handler.json_rows.raw import RawRows
from handler.json_rows.reference import ReferenceRows
from handler.json_rows.request import (
    CONTEXT,
    CONTEXT_FIELD,
    DENSE_FIELD,
    FIELD_NAMES,
    INSTANCES_FIELD,
    LENGTHS_FIELD,
    ROW_FIELD_SET,
    VALUES_FIELD,
    RowsRequest,
    check_keys,
    given_twice,
    instance_list,
)
from handler.rows import FeatureRows, preprocessed_ranking


class Rankings:
    """Ranking requests' checks and rows, for one model configuration."""

    def __init__(self, reference: ReferenceRows, raw: RawRows) -> None:
        self.reference = reference
        self.raw = raw
        self.validator = reference.validator

    def decode(self, payload: dict) -> RowsRequest:
        """A body with a ``context``: its candidates' rows and its context row."""
        check_keys(
            payload,
            {CONTEXT_FIELD, INSTANCES_FIELD},
            f"a ranking request has only {CONTEXT_FIELD!r} and {INSTANCES_FIELD!r}",
        )
        if INSTANCES_FIELD not in payload:
            raise InvalidRequest(
                ErrorKind.MISSING_FIELD, f"a ranking request needs {INSTANCES_FIELD!r}", field=INSTANCES_FIELD
            )
        context = payload[CONTEXT_FIELD]
        if not isinstance(context, dict):
            raise wrong_json_type(
                f"{CONTEXT_FIELD!r} must be an object of features", context, "object", field=CONTEXT_FIELD
            )
        candidates = payload[INSTANCES_FIELD]
        if context.keys() & ROW_FIELD_SET or (
            not context and isinstance(candidates, list) and candidates and not self.raw.is_raw_row(candidates[0])
        ):
            return self._reference(context, instance_list(candidates, self.validator))
        return self._raw(context, candidates)

    # ------------------------------------------------------------------ raw rows

    def _raw(self, context: dict, candidates: object) -> RowsRequest:
        """A context and its candidates in raw Criteo rows, each feature given in at most one of them."""
        unknown = [name for name in context if name not in self.raw.names]
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"{CONTEXT_FIELD}: unknown field {unknown[0]!r}; the context holds raw Criteo features "
                f"({self.raw.dense_names[0]}.., {self.raw.sparse_names[0]}..)",
                field=unknown[0],
            )
        candidates = instance_list(candidates, self.validator)
        own_dense, own_sparse = self.own_features(context)
        # Well-formed candidates with every feature the context lacks take the fast path; else a feature in both
        # is named first, then the first other problem.
        columns = self.raw.well_formed(candidates, own_dense, own_sparse)
        if columns is None:
            self._check_no_feature_twice(context, candidates)
        context_values = self.context_values(context)
        return self.raw_rows(context, context_values, columns or self.raw.values(candidates, own_dense, own_sparse))

    def own_features(self, context: dict) -> tuple[list[str], list[str]]:
        """The dense and sparse features a raw ranking's candidates give: those the context does not."""
        return (
            [name for name in self.raw.dense_names if name not in context],
            [name for name in self.raw.sparse_names if name not in context],
        )

    def context_values(self, context: dict) -> tuple[np.ndarray, np.ndarray]:
        """The raw context's checked values (as :meth:`RawRows.values`, one row), its errors named as the context's."""
        dense_names = [name for name in self.raw.dense_names if name in context]
        sparse_names = [name for name in self.raw.sparse_names if name in context]
        return self.raw.values([context], dense_names, sparse_names, CONTEXT)

    def raw_rows(
        self, context: dict, context_values: tuple[np.ndarray, np.ndarray], candidates: tuple[np.ndarray, np.ndarray]
    ) -> RowsRequest:
        """A raw ranking's rows from checked values: the candidates' (integers ``[N, own dense]``, categories
        ``[N, own sparse]``) and the context's."""
        rows, context_row = preprocessed_ranking(
            self.raw.preprocessing,
            self.validator.table_sizes,
            context_values,
            candidates,
            shared_dense=np.array([name in context for name in self.raw.dense_names]),
            shared_sparse=np.array([name in context for name in self.raw.sparse_names]),
        )
        return RowsRequest(rows=rows, single_row=False, context=context_row)

    def _check_no_feature_twice(self, context: dict, candidates: list) -> None:
        schema = self.raw.dense_names + self.raw.sparse_names
        for index, row in enumerate(candidates):
            if not isinstance(row, dict):
                continue  # the raw-row decode names it
            both = next((name for name in schema if name in row and name in context), None)
            if both is not None:
                raise given_twice(both, index)

    # ------------------------------------------------------------------ the reference format

    def _reference(self, context: dict, candidates: list) -> RowsRequest:
        """A context and candidates in the reference format (the OIP ranking request's rules, in JSON)."""
        context_row = self._reference_context(context)
        own = context_row.lengths[0] == 0
        fields = ROW_FIELD_SET - {DENSE_FIELD} if DENSE_FIELD in context else ROW_FIELD_SET
        widths = tuple(sorted({int(own.sum()), own.size}))
        context_fields = frozenset(context.keys() & {DENSE_FIELD})
        dense_rows, length_rows, value_rows = self.reference.fields(candidates, fields, widths, context_fields)
        ids = self.reference.ids(value_rows, sum(map(len, value_rows)))
        dense = None if DENSE_FIELD in context else values.float32(dense_rows)
        rows = self.validator.ranking_rows(
            context_row, dense, length_rows, ids, FIELD_NAMES, CONTEXT_FIELD, sent_dense=dense_rows
        )
        return RowsRequest(rows, single_row=False, context=context_row)

    def _reference_context(self, context: dict) -> FeatureRows:
        """The context of a reference-format ranking as one row (no ids: lengths 0; no dense values: zeros)."""
        unknown = sorted(context.keys() - ROW_FIELD_SET)
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"{CONTEXT.prefix(0)}unknown field {unknown[0]!r}; a reference-format context holds {DENSE_FIELD!r}, "
                f"or {LENGTHS_FIELD!r} with {VALUES_FIELD!r}, or all three",
                field=unknown[0],
            )
        fields = context.keys() | (
            {LENGTHS_FIELD, VALUES_FIELD} if context.keys() & {LENGTHS_FIELD, VALUES_FIELD} else set()
        )
        dense_rows, length_rows, value_rows = self.reference.row_fields(context, 0, frozenset(fields), location=CONTEXT)
        num_dense, num_sparse = self.reference.num_dense, self.reference.num_sparse
        dense = values.float32(dense_rows) if dense_rows else np.zeros((1, num_dense), dtype=np.float32)
        lengths = np.array(length_rows or [[0] * num_sparse], dtype=np.int64)
        ids = self.reference.ids(value_rows, int(lengths.sum()), CONTEXT)
        return self.validator.check(FeatureRows(dense, lengths, ids), FIELD_NAMES, CONTEXT, dense_rows or None)
