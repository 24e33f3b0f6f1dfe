"""The table file, ``tables.bin``: its layout, writing it, streaming it in, mapping it.

The file holds the quantized tables laid out exactly as FBGEMM's inference TBEs
hold them in memory on CPU: the ``weights_host`` buffer of each TBE TorchRec
builds, one after the other, rows padded to the CPU row alignment (4 bytes) and
every table starting on a 128-byte cache line (:func:`model_factory.tbe.table_file_layout`
asks FBGEMM for that layout). A frequency-ordered file (``build_mar.py
--frequencies``) holds each table's rows hottest first and, after the tables,
each TBE's remap, the row of each id, starting on a page of its own
(:mod:`model_factory.row_order`). The artifact records the layout
(:class:`TableFile`) and loading checks it.

On CPU, loading maps the file read-only and shared (:func:`map_read_only`) and
hands the mapping to the TBEs: every process serving the archive (each
TorchServe worker) reads the page cache's one copy. Elsewhere (GPU, or a copy
asked for) the file is streamed row block by row block into the tables FBGEMM
allocated (:func:`read_table_file`).

``torch.load`` is not used for table files: they hold raw bytes whose layout the
artifact describes and whose size is checked, no pickle at all. Nothing here
knows TorchRec's or FBGEMM's objects: tables come and go as ``(rows, row_bytes)``
uint8 tensors.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from model_factory.config import ConfigError
from model_factory.files import replacing
from model_factory.quantization import TableDtype
from model_factory.row_order import REMAP_DTYPE, remap

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 64 * 2**20
# Linux 5.14+: fault every page of a range in, reading from the file what the page cache lacks.
MADV_POPULATE_READ = 22


@dataclass(frozen=True)
class StoredTable:
    """Where one table's rows sit in its TBE's part of the table file."""

    name: str
    dtype: TableDtype
    rows: int
    dim: int
    row_bytes: int  # unpadded: the row's data, scale and bias
    stride: int  # from one row to the next: ``row_bytes`` rounded up to the row alignment
    offset: int  # of the first row, from the start of the TBE's part


@dataclass(frozen=True)
class TbePart:
    """One TBE's ``weights_host``: ``size`` bytes at ``offset`` in the table file, holding ``tables``.

    ``remap_offset``: in a frequency-ordered file, where the TBE's remap starts: for each
    of its tables in turn, the row of each id (:data:`~model_factory.row_order.REMAP_DTYPE`),
    as FBGEMM's ``index_remappings_array`` holds it.
    """

    offset: int
    size: int
    tables: tuple[StoredTable, ...]
    remap_offset: int | None = None

    @property
    def remap_size(self) -> int:
        if self.remap_offset is None:
            return 0
        return REMAP_DTYPE.itemsize * sum(table.rows for table in self.tables)


@dataclass(frozen=True)
class TableFile:
    """The layout of ``tables.bin``, recorded in ``model_config.json`` and checked at load."""

    row_alignment: int
    tbes: tuple[TbePart, ...]

    @property
    def size(self) -> int:
        ends = [part.offset + part.size for part in self.tbes]
        ends += [part.remap_offset + part.remap_size for part in self.tbes if part.remap_offset is not None]
        return max(ends, default=0)

    @property
    def frequency_ordered(self) -> bool:
        return any(part.remap_offset is not None for part in self.tbes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "row_alignment": self.row_alignment,
            "size": self.size,
            "tbes": [
                {"offset": part.offset, "size": part.size, "tables": [asdict(table) for table in part.tables]}
                | ({"remap_offset": part.remap_offset} if part.remap_offset is not None else {})
                for part in self.tbes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableFile:
        """The layout :meth:`to_dict` wrote; ``KeyError``, ``TypeError`` or ``ValueError`` for anything else."""
        layout = cls(
            row_alignment=int(data["row_alignment"]),
            tbes=tuple(
                TbePart(
                    offset=int(part["offset"]),
                    size=int(part["size"]),
                    tables=tuple(
                        StoredTable(**{**table, "dtype": TableDtype(table["dtype"])}) for table in part["tables"]
                    ),
                    remap_offset=None if part.get("remap_offset") is None else int(part["remap_offset"]),
                )
                for part in data["tbes"]
            ),
        )
        if data["size"] != layout.size:
            raise ValueError(f"the table file's size {data['size']} is not its TBEs' {layout.size} bytes")
        return layout


def row_blocks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` ranges of rows of about ``_CHUNK_BYTES`` each."""
    block = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, rows, block):
        yield start, min(rows, start + block)


def write_table_file(
    layout: TableFile,
    path: Path,
    rows_of: Callable[[StoredTable], torch.Tensor],
    order_of: Callable[[StoredTable], torch.Tensor] | None = None,
) -> None:
    """Write ``path`` as ``layout`` lays it out, asking ``rows_of`` for each table's ``(rows, row_bytes)`` rows in turn.

    Tables are asked for one at a time, in file order, and nothing of one is kept
    once it is written: a caller that makes each table when asked (quantizing it
    from a checkpoint) never holds more than one. A frequency-ordered layout needs
    ``order_of``, each table's ids in row order (:func:`~model_factory.row_order.row_order`):
    row ``r`` of the file is row ``order[r]`` of ``rows_of``, and the table's remap
    is written where the layout puts it. Padding is zero. An existing file is
    replaced, not rewritten: processes that map it keep their tables
    (:mod:`model_factory.files`).
    """
    if layout.frequency_ordered != (order_of is not None):
        raise ValueError("a frequency-ordered layout needs each table's row order, and only it")
    with replacing(path) as output:
        for part in layout.tbes:
            remap_at = part.remap_offset
            for table in part.tables:
                view = rows_of(table)
                assert view.shape == (table.rows, table.row_bytes), (table, view.shape)
                order = order_of(table) if order_of is not None else None
                output.seek(part.offset + table.offset)
                for start, end in row_blocks(table.rows, table.stride):
                    block = torch.zeros((end - start, table.stride), dtype=torch.uint8)
                    block[:, : table.row_bytes] = view[start:end] if order is None else view[order[start:end]]
                    output.write(block.numpy().data)
                del view
                if order is not None and remap_at is not None:
                    output.seek(remap_at)
                    output.write(remap(order).numpy().data)
                    remap_at += REMAP_DTYPE.itemsize * table.rows
        output.truncate(layout.size)  # what the writes skipped (padding) reads as zeros


def check_size(path: Path, layout: TableFile) -> None:
    """A :class:`ConfigError` naming ``path`` and the size ``layout`` needs unless the file has exactly that size."""
    try:
        actual = path.stat().st_size
    except OSError as error:
        raise ConfigError(f"cannot read the table file {path} ({layout.size} bytes expected): {error}") from error
    if actual != layout.size:
        raise ConfigError(f"{path} holds {actual} bytes, the archive's table layout needs {layout.size}")


def read_table_file(layout: TableFile, path: Path, views: Mapping[str, torch.Tensor]) -> None:
    """Stream the table file into ``views``, each table's ``(rows, row_bytes)`` rows, row block by row block.

    Works for any device and row alignment: each row's unpadded bytes are copied
    from where ``layout`` puts them into the view, so no second copy of the
    tables is ever in memory.
    """
    check_size(path, layout)
    with open(path, "rb") as source:
        for part in layout.tbes:
            for table in part.tables:
                view = views[table.name]
                if view.shape != (table.rows, table.row_bytes):
                    raise ConfigError(
                        f"{path}: table {table.name} is {table.rows} rows of {table.row_bytes} bytes, "
                        f"the model's is {tuple(view.shape)}"
                    )
                source.seek(part.offset + table.offset)
                for start, end in row_blocks(table.rows, table.stride):
                    block = torch.empty((end - start) * table.stride, dtype=torch.uint8)
                    if source.readinto(block.numpy().data) != block.numel():
                        raise ConfigError(f"{path} ended inside table {table.name}")
                    view[start:end].copy_(block.view(end - start, table.stride)[:, : table.row_bytes])


def read_remap(path: Path, part: TbePart) -> torch.Tensor:
    """The TBE's remap (``part.remap_offset`` must be set), read from the table file into memory."""
    assert part.remap_offset is not None
    remap_rows = torch.empty(part.remap_size // REMAP_DTYPE.itemsize, dtype=REMAP_DTYPE)
    with open(path, "rb") as source:
        source.seek(part.remap_offset)
        if source.readinto(remap_rows.numpy().data) != part.remap_size:
            raise ConfigError(f"{path} ended inside the remap of tables {[table.name for table in part.tables]}")
    return remap_rows


def map_read_only(path: Path, layout: TableFile) -> torch.Tensor:
    """``path``'s bytes as a uint8 tensor over a ``MAP_SHARED``, ``PROT_READ`` mapping of the file.

    Shared and read-only: every process mapping the file reads the page cache's
    one copy of each page, the file is opened read-only and nothing can be
    written through the mapping (a write faults instead of changing the file, or
    of silently copying the page as a private mapping would). Such a mapping is
    not charged against the commit limit either. The tensor keeps the mapping
    alive; it survives the file being unlinked (an extracted archive's
    temporary directory), not the file being truncated or rewritten in place,
    which nothing here does: builds replace files by renaming.
    """
    try:
        with open(path, "rb") as file:
            actual = os.fstat(file.fileno()).st_size
            if actual != layout.size:
                raise ConfigError(f"{path} holds {actual} bytes, the archive's table layout needs {layout.size}")
            mapping = mmap.mmap(file.fileno(), layout.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError as error:
        raise ConfigError(f"cannot map the table file {path} ({layout.size} bytes expected): {error}") from error
    with warnings.catch_warnings():
        # PyTorch warns that it cannot mark tensors read-only; the mapping is (PROT_READ) and nothing writes to it.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)


def populate_in_background(mapping: torch.Tensor, path: Path, resident: Sequence[tuple[int, int]]) -> threading.Thread:
    """Map the ``resident`` byte ranges ``(offset, length)`` of a table file's ``mapping`` into this process on a
    background thread, and advise the rest of it ``MADV_RANDOM``.

    A process pays a page fault the first time it touches each page of a mapping, so until it has
    touched them all, requests pay faults for the rows they look up (docs/performance/ measures what
    that costs). ``MADV_POPULATE_READ`` maps a range in one call (the pages stay the page cache's,
    shared with every other process); from a cold page cache it reads the file while the worker
    already answers. The thread runs at ``SCHED_IDLE`` priority, so that it does not slow the requests
    it is there to speed up, and ctypes releases the GIL for the call. What is not kept resident (a
    file larger than the memory budget: :mod:`model_factory.residency`) is read a page per fault, without
    readahead (``MADV_RANDOM``). Ranges are widened to whole pages. Returns the thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    def advise(start: int, end: int, advice: int) -> None:
        if libc.madvise(mapping.data_ptr() + start, end - start, advice) != 0:
            error = os.strerror(ctypes.get_errno())
            logger.info("%s: pages %d-%d are mapped as requests touch them (madvise: %s)", path, start, end, error)

    pages = _whole_pages(resident, mapping.numel())
    for start, end in _gaps(pages, mapping.numel()):
        advise(start, end, mmap.MADV_RANDOM)

    def populate() -> None:
        with suppress(OSError):  # this thread only runs on CPU time nothing else wants
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        for start, end in pages:
            advise(start, end, MADV_POPULATE_READ)

    thread = threading.Thread(target=populate, name=f"populate {path.name}", daemon=True)
    thread.start()
    return thread


def _whole_pages(ranges: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` byte ranges as sorted, merged ``[start, end)`` ranges of whole pages within ``size``."""
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        start, end = (
            offset // mmap.PAGESIZE * mmap.PAGESIZE,
            min(size, -(-(offset + length) // mmap.PAGESIZE) * mmap.PAGESIZE),
        )
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        elif end > start:
            merged.append((start, end))
    return merged


def _gaps(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """What sorted, disjoint ``[start, end)`` ``ranges`` leave of ``[0, size)``."""
    bounds = [0, *(bound for start_end in ranges for bound in start_end), size]
    return [(start, end) for start, end in zip(bounds[::2], bounds[1::2], strict=True) if end > start]
