"""DLRM's forward for a batch in which some requests rank candidates against a shared context.

A ranking request's candidates share the context's sparse features: their pooled
embeddings are one vector each, for every candidate. TorchRec's ``DLRM.forward``
would still take, per candidate, every pairwise dot product and the whole first
layer of the over arch over them. Here, for a DLRM with TorchRec's dot
``InteractionArch`` and a float first over-arch layer, the interaction is split by
what each pair involves:

- a candidate's own vectors (its dense embedding and own sparse features) with each
  other: a smaller ``bmm`` per candidate;
- an own vector with a context vector: one matrix product of all candidates'
  own vectors with the context's, already in a fixed order (nothing to gather);
- two context vectors: the same for every candidate, so their products and their
  share of the first layer become a per-request bias.

The first layer's weight columns are permuted once per context set to that
layout (cached), so the layer runs on the split products directly. Sum pooling
and the linearity of the first layer make this the expanded rows' result, up to
float rounding. Other models (an int8 dynamic-quantized first layer, whose
activation scale depends on its whole input) get the context's vectors broadcast
into each candidate's and TorchRec's own interaction and over arch: the lookups
are still shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, InteractionArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Context sets are the requests' choice; a few distinct ones are typical.
CACHED_CONTEXT_SETS = 16


@dataclass(frozen=True)
class Segment:
    """Consecutive rows ``[start, end)`` of a batch, and the context they share, if any.

    ``context_row``: the context's row among the batch's pooled embeddings.
    ``shared``: one flag per sparse feature, ``True`` for the context's features.
    """

    start: int
    end: int
    context_row: int | None = None
    shared: tuple[bool, ...] = ()


@dataclass(frozen=True)
class FoldedLayer:
    """The over arch's first layer, its weight columns split for one context set.

    ``own`` and ``context``: interaction indices (0 the dense embedding, ``1 + f``
    sparse feature ``f``). Weights, each ``[H, ...]``: ``dense_weight`` ``[H, D]``
    for the dense embedding itself; ``own_weight`` for the own-own pairs, in
    ``own_pairs`` order (indices into the flattened ``[own, own]`` products);
    ``cross_weight`` for the own-context products, ``(own, context)`` row-major;
    ``context_weight`` for the context-context pairs, in ``context_pairs`` order.
    """

    own: list[int]
    context: list[int]
    dense_weight: torch.Tensor
    own_weight: torch.Tensor
    cross_weight: torch.Tensor
    context_weight: torch.Tensor
    own_pairs: torch.Tensor
    context_pairs: torch.Tensor


class RankingForward:
    """``DLRM.forward`` over :class:`Segment` s: plain rows as TorchRec computes them, rankings split."""

    def __init__(self, model: DLRM) -> None:
        self.model = model
        self.feature_names = list(model.sparse_arch.sparse_feature_names)
        first_perceptron = model.over_arch.model[0]._mlp[0]
        self.first_layer = first_perceptron._linear
        self.first_activation = first_perceptron._activation_fn
        self.rest = nn.Sequential(*model.over_arch.model[0]._mlp[1:], model.over_arch.model[1])
        # A subclass may interact differently, and a quantized layer is not linear in its input.
        self.foldable = type(model.inter_arch) is InteractionArch and type(self.first_layer) is nn.Linear
        rows, columns = model.inter_arch.triu_indices.tolist()
        self.pair_column = {pair: index for index, pair in enumerate(zip(rows, columns, strict=True))}
        self.folded = lru_cache(maxsize=CACHED_CONTEXT_SETS)(self._fold)

    def __call__(self, dense: torch.Tensor, sparse: KeyedJaggedTensor, segments: Sequence[Segment]) -> torch.Tensor:
        """Logits ``[rows]`` for ``dense`` ``[rows, num_dense]`` and ``sparse`` (a KJT of ``rows`` rows, then
        the segments' context rows), in row order."""
        pooled = self.model.sparse_arch.embedding_bag_collection(sparse).to_dict()
        embeddings = [pooled[name] for name in self.feature_names]  # each [rows + contexts, D]
        dense_embedding = self.model.dense_arch(dense)  # [rows, D]
        logits = [self._segment(dense_embedding, embeddings, segment) for segment in segments]
        return torch.cat(logits).float()

    def _segment(self, dense_embedding: torch.Tensor, embeddings: list[torch.Tensor], segment: Segment) -> torch.Tensor:
        start, end, context_row = segment.start, segment.end, segment.context_row
        if context_row is not None and self.foldable and any(segment.shared):
            return self._folded(dense_embedding[start:end], embeddings, segment)
        columns = [column[start:end] for column in embeddings]
        if context_row is not None:  # the context's vectors, broadcast to its candidates
            columns = [
                embeddings[feature][context_row].expand(end - start, -1) if shared else column
                for feature, (column, shared) in enumerate(zip(columns, segment.shared, strict=True))
            ]
        sparse = torch.stack(columns, dim=1)  # [n, F, D]
        interaction = self.model.inter_arch(dense_features=dense_embedding[start:end], sparse_features=sparse)
        return self.model.over_arch(interaction).squeeze(1)

    def _folded(self, dense_embedding: torch.Tensor, embeddings: list[torch.Tensor], segment: Segment) -> torch.Tensor:
        layer = self.folded(segment.shared)
        start, end, context_row = segment.start, segment.end, segment.context_row
        own = torch.stack(
            [dense_embedding, *(embeddings[index - 1][start:end] for index in layer.own[1:])], dim=1
        )  # [n, own, D]
        context = torch.stack([embeddings[index - 1][context_row] for index in layer.context])  # [context, D]
        own_products = torch.bmm(own, own.transpose(1, 2)).flatten(1).index_select(1, layer.own_pairs)
        cross_products = torch.matmul(own, context.T).flatten(1)  # [n, own * context]
        context_products = (context @ context.T).flatten().index_select(0, layer.context_pairs)
        bias = torch.addmv(self.first_layer.bias, layer.context_weight, context_products)
        hidden = (
            torch.addmm(bias, cross_products, layer.cross_weight.T)
            .addmm_(own_products, layer.own_weight.T)
            .addmm_(dense_embedding, layer.dense_weight.T)
        )  # the first layer's [n, H] without concatenating its input
        return self.rest(self.first_activation(hidden)).squeeze(1)

    def _fold(self, shared: tuple[bool, ...]) -> FoldedLayer:
        """The first layer's columns for the context set ``shared``; index 0 is the dense embedding, 1 + f feature f."""
        own = [0] + [1 + feature for feature, is_shared in enumerate(shared) if not is_shared]
        context = [1 + feature for feature, is_shared in enumerate(shared) if is_shared]
        own_pairs = [(a, b) for a in range(len(own)) for b in range(a + 1, len(own))]
        context_pairs = [(a, b) for a in range(len(context)) for b in range(a + 1, len(context))]
        weight = self.first_layer.weight.detach()
        dim = weight.shape[1] - len(self.pair_column)
        pairs = weight[:, dim:]

        def columns(pairs_of: list[tuple[int, int]]) -> list[int]:
            return [self.pair_column[(min(a, b), max(a, b))] for a, b in pairs_of]

        own_columns = columns([(own[a], own[b]) for a, b in own_pairs])
        cross_columns = columns([(o, c) for o in own for c in context])
        context_columns = columns([(context[a], context[b]) for a, b in context_pairs])

        def flat(pairs_of: list[tuple[int, int]], size: int) -> torch.Tensor:
            return torch.tensor([a * size + b for a, b in pairs_of], dtype=torch.long, device=weight.device)

        return FoldedLayer(
            own=own,
            context=context,
            dense_weight=weight[:, :dim].contiguous(),
            own_weight=pairs[:, own_columns].contiguous(),
            cross_weight=pairs[:, cross_columns].contiguous(),
            context_weight=pairs[:, context_columns].contiguous(),
            own_pairs=flat(own_pairs, len(own)),
            context_pairs=flat(context_pairs, len(context)),
        )
