"""Which pages of the mapped table file a worker keeps resident, decided by the memory it may use.

Each worker maps ``tables.bin`` (:mod:`model_factory.table_file`) and reads the
page cache's one copy. How it treats the mapping depends on the file's size
against the memory budget (:func:`memory_budget`), in one of three regimes
(:func:`plan_residency`, logged in one line when the tables load):

- **fits**: the file is no larger than the budget; every page is populated in
  the background, and requests never wait for the disk once it is done.
- **partly resident**: a frequency-ordered file (``build_mar.py --frequencies``)
  that does not fit. Its remaps, which every lookup reads, and then the hottest
  rows across all tables, by the counts the archive records
  (:class:`~model_factory.row_order.FrequencyOrder`), are populated up to the
  budget: in frequency order those rows are a prefix of each table, one byte
  range each. The rest of the file is advised ``MADV_RANDOM``.
- **cold**: nothing is populated, and the whole mapping is advised
  ``MADV_RANDOM``: an id-ordered file that does not fit (its hot rows are spread
  over all of its pages, so no range is hotter than another), or a budget
  smaller than the remaps.

``MADV_RANDOM`` turns readahead off: a page fault reads the one page a lookup
needs instead of 128 KiB around it, whose other rows are no more likely to be
looked up (colder ones, in frequency order) and would evict hotter pages.

The budget is the smaller of the kernel's ``MemAvailable`` and, in a cgroup with
a memory limit, that limit less the group's memory other than file pages (the
page cache counts against the limit; file pages are what the tables become).
:data:`BUDGET_VARIABLE` overrides both, to leave memory to something else, or to
test and measure the regimes on a machine with more memory than they need.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from model_factory.config import ConfigError
from model_factory.factory import human_bytes
from model_factory.row_order import FrequencyOrder
from model_factory.table_file import TableFile

logger = logging.getLogger(__name__)

# Bytes of memory the table file's pages may take, overriding what the kernel and the cgroup say:
# an integer, optionally followed by K, M, G or T (powers of 1024).
BUDGET_VARIABLE = "DLRM_TABLES_MEMORY"
_SIZE = re.compile(r"(\d+)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value.
_NO_LIMIT = 2**62


class Regime(StrEnum):
    FITS = "fits"
    PARTLY_RESIDENT = "partly resident"
    COLD = "cold"


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes the table file's pages may take in memory, and what said so."""

    bytes: int
    source: str

    def __str__(self) -> str:
        return f"memory budget {human_bytes(self.bytes)} ({self.source})"


@dataclass(frozen=True)
class ResidencyPlan:
    """The regime of a table file against a budget, and the byte ranges ``(offset, length)`` kept resident.

    ``lookup_share``: of the lookups the file's frequencies counted, the share that
    the resident rows take (``None`` for an id-ordered file).
    """

    regime: Regime
    file_bytes: int
    budget: MemoryBudget
    resident: tuple[tuple[int, int], ...]
    lookup_share: float | None

    @property
    def resident_bytes(self) -> int:
        return sum(length for _, length in self.resident)

    def describe(self, path: Path) -> str:
        """The one log line saying the regime and how much of the file is resident."""
        size = human_bytes(self.file_bytes)
        if self.regime == Regime.FITS:
            return f"{path}: {self.regime}: all {size} populated in the background; {self.budget}"
        if self.regime == Regime.PARTLY_RESIDENT:
            return (
                f"{path}: {self.regime}: {human_bytes(self.resident_bytes)} of {size} populated (the remaps and the "
                f"hottest rows, {self.lookup_share:.1%} of the lookups counted in training), the rest read from disk "
                f"as requests touch it, without readahead; {self.budget}"
            )
        reason = (
            "its rows are in id order: build the archive with --frequencies to keep the hottest rows resident"
            if self.lookup_share is None
            else "the budget does not hold the remaps"
        )
        return (
            f"{path}: {self.regime}: nothing populated, all {size} read from disk as requests touch it, without "
            f"readahead ({reason}); {self.budget}"
        )


def plan_residency(layout: TableFile, order: FrequencyOrder | None, budget: MemoryBudget) -> ResidencyPlan:
    """The regime of a table file laid out as ``layout`` and the byte ranges to keep resident (a pure function).

    In a partly resident file, the remaps come first, then the rows by descending
    level of count across all tables (:func:`~model_factory.row_order.levels`):
    each level whole while it fits, and of the first level that does not fit, the
    same share of every table's rows. Rows never seen are never populated.
    """
    size = layout.size
    if size <= budget.bytes:
        return ResidencyPlan(Regime.FITS, size, budget, ((0, size),) if size else (), 1.0 if order else None)
    remaps = [(part.remap_offset, part.remap_size) for part in layout.tbes if part.remap_offset is not None]
    remap_bytes = sum(length for _, length in remaps)
    if order is None or remap_bytes > budget.bytes:
        return ResidencyPlan(Regime.COLD, size, budget, (), None if order is None else 0.0)
    tables = {table.name: (part.offset + table.offset, table.stride) for part in layout.tbes for table in part.tables}
    prefix = dict.fromkeys(tables, 0)
    left, taken = budget.bytes - remap_bytes, 0.0
    counts = sorted({level.count for levels in order.tables.values() for level in levels}, reverse=True)
    for count in counts:
        level_of = {name: level for name, levels in order.tables.items() for level in levels if level.count == count}
        needed = sum(level.rows * tables[name][1] for name, level in level_of.items())
        share = min(1.0, left / needed)
        for name, level in level_of.items():
            rows = level.rows if share == 1.0 else int(level.rows * share)
            prefix[name] += rows
            left -= rows * tables[name][1]
            taken += level.lookups * rows / level.rows
        if share < 1.0:
            break
    lookups = sum(level.lookups for levels in order.tables.values() for level in levels)
    prefixes = [(tables[name][0], rows * tables[name][1]) for name, rows in prefix.items() if rows]
    return ResidencyPlan(
        Regime.PARTLY_RESIDENT, size, budget, tuple(sorted(remaps + prefixes)), taken / lookups if lookups else 0.0
    )


def decide(layout: TableFile, order: FrequencyOrder | None, path: Path) -> ResidencyPlan:
    """The plan for the table file at ``path`` against this process's memory budget, logged in one line."""
    plan = plan_residency(layout, order, memory_budget())
    logger.info("%s", plan.describe(path))
    return plan


def memory_budget(
    environ: Mapping[str, str] = os.environ, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> MemoryBudget:
    """The memory the table file's pages may take: :data:`BUDGET_VARIABLE` if set, else the smaller of
    ``MemAvailable`` and the cgroup's limit less its memory other than file pages (see the module docstring).

    ``cgroup_root`` is where the cgroup file systems are mounted, ``proc_cgroup`` the
    file naming this process's groups.
    """
    override = environ.get(BUDGET_VARIABLE)
    if override is not None:
        return MemoryBudget(parse_size(override, BUDGET_VARIABLE), BUDGET_VARIABLE)
    cgroup = _cgroup_budget(cgroup_root, proc_cgroup)
    budgets = [budget for budget in (_available_memory(), cgroup) if budget is not None]
    return min(budgets, key=lambda budget: budget.bytes, default=MemoryBudget(2**63 - 1, "no limit known"))


def parse_size(text: str, name: str) -> int:
    """``4096``, ``512M`` or ``2GiB`` as bytes; a :class:`ConfigError` naming ``name`` otherwise."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{name} must be a number of bytes, optionally with K, M, G or T (powers of 1024): {text!r}")
    number, unit = match.groups()
    return int(number) * 1024 ** "_KMGT".index((unit or "_").upper())


def _available_memory() -> MemoryBudget | None:
    """The kernel's estimate of memory available without swapping (``MemAvailable``)."""
    meminfo = _key_values(Path("/proc/meminfo"))
    return MemoryBudget(meminfo["MemAvailable:"] * 1024, "MemAvailable") if "MemAvailable:" in meminfo else None


def _cgroup_budget(root: Path, proc_cgroup: Path) -> MemoryBudget | None:
    """The memory limit of this process's cgroup less the group's memory other than file pages, if it has one."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    groups = {controllers: path for _, controllers, path in (line.split(":", 2) for line in lines)}
    version_1 = next((path for controllers, path in groups.items() if "memory" in controllers.split(",")), None)
    if version_1 is not None:
        directory = _group_directory(root / "memory", version_1)
        stat = _key_values(directory / "memory.stat")
        limit = stat.get("hierarchical_memory_limit") or _read_int(directory / "memory.limit_in_bytes")
        usage = _read_int(directory / "memory.usage_in_bytes")
        files = stat.get("total_active_file", 0) + stat.get("total_inactive_file", 0)
    elif "" in groups and (root / "cgroup.controllers").exists():  # version 2, the unified hierarchy
        directory = _group_directory(root, groups[""])
        ancestors = [group for group in (directory, *directory.parents) if group.is_relative_to(root)]
        limits = [_read_int(group / "memory.max") for group in ancestors]
        limit = min((value for value in limits if value is not None), default=None)
        usage = _read_int(directory / "memory.current")
        stat = _key_values(directory / "memory.stat")
        files = stat.get("active_file", 0) + stat.get("inactive_file", 0)
    else:
        return None
    if limit is None or limit >= _NO_LIMIT or usage is None:
        return None
    return MemoryBudget(max(0, limit - usage + files), "the cgroup's memory limit")


def _group_directory(mount: Path, path: str) -> Path:
    """The cgroup's directory under ``mount``: where ``/proc/self/cgroup`` says, or the mount itself where that
    path is not visible (a container sees its own group at the root)."""
    directory = mount / path.lstrip("/")
    return directory if directory.is_dir() else mount


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file; ``None`` for ``max`` (no limit) or a file that cannot be read."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _key_values(path: Path) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``/proc/meminfo``) as integers; empty if the file cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {fields[0]: int(fields[1]) for fields in map(str.split, lines) if len(fields) >= 2 and fields[1].isdigit()}
