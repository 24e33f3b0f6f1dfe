"""The Criteo feature schema and how rows of features become TorchRec inputs.

TorchRec's Criteo names are used unchanged (``int_0..int_12`` dense,
``cat_0..cat_25`` sparse) so that TorchRec's datasets, the trainer, the archive
and the request decoder all agree on which column feeds which table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

DENSE_FEATURE_NAMES: tuple[str, ...] = tuple(DEFAULT_INT_NAMES)
SPARSE_FEATURE_NAMES: tuple[str, ...] = tuple(DEFAULT_CAT_NAMES)


def rows_to_kjt(keys: Sequence[str], lengths: np.ndarray, values: np.ndarray) -> KeyedJaggedTensor:
    """Build TorchRec's key-major ``KeyedJaggedTensor`` from row-major sparse features.

    Requests and data files list ids row by row (``lengths[row, feature]`` ids of
    feature 0, then feature 1, ...), while a KJT stores all rows of feature 0,
    then all rows of feature 1. A stable sort of the ids by (feature, row) does
    the transpose in one vectorised step.
    """
    rows, num_features = lengths.shape
    if rows > 1:
        segment = np.repeat(np.arange(rows * num_features), lengths.ravel())
        row, feature = np.divmod(segment, num_features)
        values = values[np.argsort(feature * rows + row, kind="stable")]
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
        lengths=torch.from_numpy(np.ascontiguousarray(lengths.T, dtype=np.int64).ravel()),
    )
