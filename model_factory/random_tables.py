"""Seeded random quantized tables, written directly in the quantized format: no fp32 table ever exists.

Written row block by row block, so an untrained archive never materialises the
45 GB fp32 Criteo-1TB tables. Such a model is not the fp32 model of the same seed
quantized: compare quantization options from one checkpoint.
"""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from model_factory.config import DLRMConfig
from model_factory.factory import build_dlrm, init_weights
from model_factory.quantization import QuantizationSpec
from model_factory.table_file import row_blocks
from model_factory.tbe import empty_quantized_collection, tbe_modules


def fill_random(collection: QuantEmbeddingBagCollection, seed: int) -> None:
    """Seeded random tables written directly in the quantized format, row block by row block.

    Values are uniform in ±sqrt(1/rows), TorchRec's default initialisation: for
    int8/int4 rows random codes with the scale and bias that map the code range
    onto that interval; for fp32/fp16 rows the values themselves.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in tbe_modules(collection):
        for (_, rows, _, sparse_type, _), (data, scale, bias) in zip(
            module.embedding_specs, module.split_embedding_weights_with_scale_bias(2), strict=True
        ):
            bound = (1.0 / rows) ** 0.5
            for start, end in row_blocks(rows, data.shape[1]):
                if scale is None:  # a float row (fp32, fp16) is the values
                    dtype = sparse_type.as_dtype()
                    values = torch.empty((end - start, data.shape[1] // dtype.itemsize), dtype=dtype)
                    data[start:end].view(dtype).copy_(values.uniform_(-bound, bound, generator=generator))
                    continue
                codes = 2 ** sparse_type.bit_rate() - 1
                random_bytes = torch.randint(
                    0, 256, (end - start, data.shape[1]), dtype=torch.uint8, generator=generator
                )
                data[start:end].copy_(random_bytes)
                scale[start:end].fill_(2 * bound / codes)
                assert bias is not None
                bias[start:end].fill_(-bound)


def random_quantized_model(config: DLRMConfig, spec: QuantizationSpec, seed: int) -> DLRM:
    """A seeded random model whose tables are created quantized: no fp32 table ever exists."""
    model = build_dlrm(config)
    tables = empty_quantized_collection(config, spec, torch.device("cpu"))
    fill_random(tables, seed)
    model.sparse_arch.embedding_bag_collection = tables
    return init_weights(model, seed)
