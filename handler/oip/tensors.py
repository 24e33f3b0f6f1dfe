"""An OIP request's input tensors → model rows: model inputs, raw Criteo rows, or a ranking request.

The inputs are :mod:`handler.oip`'s table: ``dense_features``, ``sparse_lengths`` and ``sparse_ids``,
or the raw rows' ``int_features`` and ``cat_features``; a ranking request adds a context row
beside the model inputs (``context_sparse_lengths`` with ``context_sparse_ids``, and/or
``context_dense_features`` in place of ``dense_features``), whose rules are
:meth:`~handler.rows.RowValidator.ranking_rows`'.
"""

from __future__ import annotations

import numpy as np

from handler import values
from handler.errors import ErrorKind, InvalidRequest
from handler.oip.schema import (
    CONTEXT_DENSE_INPUT,
    CONTEXT_FIELD_NAMES,
    CONTEXT_IDS_INPUT,
    CONTEXT_INPUTS,
    CONTEXT_LENGTHS_INPUT,
    DENSE_INPUT,
    FIELD_NAMES,
    IDS_INPUT,
    LENGTHS_INPUT,
    MODEL_INPUTS,
    RAW_CATEGORIES_INPUT,
    RAW_INPUTS,
    RAW_INTS_INPUT,
)
from handler.oip.wire import Tensor, check_shape, shape_error
from handler.rows import FeatureRows, RowValidator, preprocessed
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing


class TensorRows:
    """Input tensors → checked model rows, for one model configuration."""

    def __init__(self, config: DLRMConfig, preprocessing: Preprocessing, validator: RowValidator) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.validator = validator
        self.num_dense = self.config.num_dense_features
        self.num_sparse = self.config.num_sparse_features

    def rows(self, tensors: dict[str, Tensor]) -> tuple[FeatureRows, FeatureRows | None]:
        """The request's rows, and a ranking request's context row (else None)."""
        if tensors.keys() & set(CONTEXT_INPUTS):
            return self._ranking_rows(tensors)
        given = set(tensors)
        names = MODEL_INPUTS if given & set(MODEL_INPUTS) or not given & set(RAW_INPUTS) else RAW_INPUTS
        extra = sorted(given - set(names))
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"input {extra[0]!r} cannot be combined with {', '.join(names)}: send model inputs "
                f"({', '.join(MODEL_INPUTS)}) or raw rows ({', '.join(RAW_INPUTS)})",
                field=extra[0],
            )
        missing = [name for name in names if name not in tensors]
        if missing:
            raise InvalidRequest(ErrorKind.MISSING_FIELD, f"the request lacks input {missing[0]!r}", field=missing[0])
        if names == RAW_INPUTS:
            return self._raw_rows(tensors[RAW_INTS_INPUT], tensors[RAW_CATEGORIES_INPUT]), None
        dense, lengths, ids = (tensors[name] for name in MODEL_INPUTS)
        rows = dense.shape[0] if dense.shape else 0
        self.validator.check_row_count(rows, DENSE_INPUT)
        check_shape(dense.name, dense.shape, (rows, self.num_dense))
        features = FeatureRows(np.asarray(dense.data).reshape(dense.shape), *self._sparse(lengths, ids, rows))
        return self.validator.check(features, FIELD_NAMES), None

    def _sparse(self, lengths: Tensor, ids: Tensor, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` rows' lengths ``[rows, 26]`` (int64) and their ids ``[total]``, their shapes checked."""
        check_shape(lengths.name, lengths.shape, (rows, self.num_sparse))
        if len(ids.shape) != 1:
            raise shape_error(ids.name, ids.shape, "[total]")
        return np.asarray(lengths.data, dtype=np.int64).reshape(lengths.shape), np.asarray(ids.data)

    def _ranking_rows(self, tensors: dict[str, Tensor]) -> tuple[FeatureRows, FeatureRows]:
        """A ranking request's candidates and context row: each sparse feature's ids in one of the two, the
        dense features per candidate (``dense_features``) or once (``context_dense_features``)."""
        extra = sorted(tensors.keys() - set(MODEL_INPUTS) - set(CONTEXT_INPUTS))
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"input {extra[0]!r} cannot be combined with context inputs: a ranking request sends model "
                f"inputs ({', '.join(MODEL_INPUTS)}) beside {', '.join(CONTEXT_INPUTS)}",
                field=extra[0],
            )
        if DENSE_INPUT in tensors and CONTEXT_DENSE_INPUT in tensors:
            raise InvalidRequest(
                ErrorKind.DUPLICATE_FIELD,
                f"the dense features are given both as {DENSE_INPUT!r} and as {CONTEXT_DENSE_INPUT!r}: send one",
                field=CONTEXT_DENSE_INPUT,
            )
        required = [CONTEXT_DENSE_INPUT if CONTEXT_DENSE_INPUT in tensors else DENSE_INPUT, LENGTHS_INPUT, IDS_INPUT]
        if tensors.keys() & {CONTEXT_LENGTHS_INPUT, CONTEXT_IDS_INPUT}:  # the context's ids come as a pair
            required += [CONTEXT_LENGTHS_INPUT, CONTEXT_IDS_INPUT]
        missing = next((name for name in required if name not in tensors), None)
        if missing is not None:
            raise InvalidRequest(ErrorKind.MISSING_FIELD, f"the request lacks input {missing!r}", field=missing)
        lengths, ids = tensors[LENGTHS_INPUT], tensors[IDS_INPUT]
        rows = lengths.shape[0] if lengths.shape else 0
        self.validator.check_row_count(rows, LENGTHS_INPUT)
        context = self._context_row(tensors)
        own = int((context.lengths[0] == 0).sum())
        if lengths.shape not in ((rows, self.num_sparse), (rows, own)):
            raise shape_error(
                lengths.name,
                lengths.shape,
                f"[{rows}, {self.num_sparse}] or [{rows}, {own}] (the features without context ids)",
            )
        dense = None
        if DENSE_INPUT in tensors:
            check_shape(DENSE_INPUT, tensors[DENSE_INPUT].shape, (rows, self.num_dense))
            dense = np.asarray(tensors[DENSE_INPUT].data).reshape(rows, self.num_dense)
        if len(ids.shape) != 1:
            raise shape_error(ids.name, ids.shape, "[total]")
        lengths_array = np.asarray(lengths.data).reshape(lengths.shape)
        candidates = self.validator.ranking_rows(
            context, dense, lengths_array, np.asarray(ids.data), FIELD_NAMES, CONTEXT_LENGTHS_INPUT
        )
        return candidates, context

    def _context_row(self, tensors: dict[str, Tensor]) -> FeatureRows:
        """The one context row: its dense values (zeros when the candidates carry them) and its sparse ids."""
        dense = np.zeros((1, self.num_dense), dtype=np.float32)
        if CONTEXT_DENSE_INPUT in tensors:
            check_shape(CONTEXT_DENSE_INPUT, tensors[CONTEXT_DENSE_INPUT].shape, (1, self.num_dense))
            dense = np.asarray(tensors[CONTEXT_DENSE_INPUT].data).reshape(1, self.num_dense)
        lengths, ids = np.zeros((1, self.num_sparse), dtype=np.int64), np.zeros(0, dtype=np.int64)
        if CONTEXT_LENGTHS_INPUT in tensors:
            lengths, ids = self._sparse(tensors[CONTEXT_LENGTHS_INPUT], tensors[CONTEXT_IDS_INPUT], 1)
        return self.validator.check(FeatureRows(dense, lengths, ids), CONTEXT_FIELD_NAMES)

    def _raw_rows(self, ints: Tensor, categories: Tensor) -> FeatureRows:
        rows = ints.shape[0] if ints.shape else 0
        self.validator.check_row_count(rows, RAW_INTS_INPUT)
        check_shape(ints.name, ints.shape, (rows, self.num_dense))
        check_shape(categories.name, categories.shape, (rows, self.num_sparse))
        assert isinstance(ints.data, list) and isinstance(categories.data, list)  # BYTES tensors
        raw_ints = np.full(len(ints.data), np.nan)
        for index, text in enumerate(ints.data):
            if text:
                value = values.decimal_int64(text)
                if value is None:
                    row, position = divmod(index, self.num_dense)
                    raise InvalidRequest(
                        ErrorKind.NON_INTEGER,
                        f"row {row}: {RAW_INTS_INPUT}[{position}] ({self.config.dense_feature_names[position]}) "
                        f"must be a decimal integer within int64 or empty, got {text!r}",
                        field=RAW_INTS_INPUT,
                        row=row,
                        expected="decimal integer or empty",
                        got=text,
                    )
                raw_ints[index] = value
        parsed = values.categories(categories.data, (rows, self.num_sparse), self._invalid_category)
        return preprocessed(
            self.preprocessing, self.validator.table_sizes, raw_ints.reshape(rows, self.num_dense), parsed
        )

    def _invalid_category(self, row: int, position: int, text: str) -> InvalidRequest:
        return InvalidRequest(
            ErrorKind.INVALID_CATEGORY,
            f"row {row}: {RAW_CATEGORIES_INPUT}[{position}] ({self.config.sparse_feature_names[position]}) "
            f"must be 8 hex digits (like '05db9164') or empty, got {text!r}",
            field=RAW_CATEGORIES_INPUT,
            row=row,
            expected="string of 8 hex digits or empty",
            got=text,
        )
