"""The regime a worker serves its mapped tables in (fits / partly resident / cold) and the memory budget deciding it.

The decision is a pure function of the table file's layout, its recorded frequencies and the budget, checked
here on a layout small enough to work out by hand; the budget is read from the environment override, the
kernel and a real cgroup. What a worker then does with the mapping (MADV_RANDOM, populating the hot ranges)
is checked on a real file in tests/test_mapped_tables.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from model_factory.config import ConfigError
from model_factory.quantization import TableDtype
from model_factory.residency import (
    BUDGET_VARIABLE,
    CGROUP_ROOT,
    MemoryBudget,
    Regime,
    _cgroup_budget,
    memory_budget,
    parse_size,
    plan_residency,
)
from model_factory.row_order import FrequencyOrder, Level
from model_factory.table_file import StoredTable, TableFile, TbePart
from servers.torchserve import REPO_ROOT

# Two tables in one TBE: "a" 100 rows of 8 bytes at 0, "b" 50 rows of 16 bytes at 896; their remaps (600 bytes)
# on the next page when frequency-ordered. The file is 4696 bytes ordered, 1696 not.
TABLES = (
    StoredTable("a", TableDtype.INT8, rows=100, dim=4, row_bytes=8, stride=8, offset=0),
    StoredTable("b", TableDtype.INT8, rows=50, dim=12, row_bytes=16, stride=16, offset=896),
)
ORDERED = TableFile(row_alignment=4, tbes=(TbePart(0, 1696, TABLES, remap_offset=4096),))
ID_ORDERED = TableFile(row_alignment=4, tbes=(TbePart(0, 1696, TABLES),))
# By level of count: 64: 2 rows of a (16 bytes); 32: 5 of b (80); 8: 10 of a and 5 of b (160); 1: 20 of a (160).
ORDER = FrequencyOrder(
    {
        "a": (Level(64, 2, 200), Level(8, 10, 100), Level(1, 20, 30)),
        "b": (Level(32, 5, 200), Level(8, 5, 50)),
    }
)
LOOKUPS = 580
REMAPS = (4096, 600)


def plan(layout: TableFile, order: FrequencyOrder | None, budget: int):
    return plan_residency(layout, order, MemoryBudget(budget, "test"))


@pytest.mark.parametrize("layout, order", [(ID_ORDERED, None), (ORDERED, ORDER)], ids=["id-ordered", "ordered"])
def test_a_file_that_fits_is_populated_whole(layout: TableFile, order: FrequencyOrder | None) -> None:
    fits = plan(layout, order, layout.size)
    assert (fits.regime, fits.resident, fits.resident_bytes) == (Regime.FITS, ((0, layout.size),), layout.size)
    assert plan(layout, order, layout.size - 1).regime != Regime.FITS


def test_an_id_ordered_file_that_does_not_fit_is_cold() -> None:
    cold = plan(ID_ORDERED, None, 1000)
    assert (cold.regime, cold.resident, cold.lookup_share) == (Regime.COLD, (), None)
    assert "build the archive with --frequencies" in cold.describe(Path("tables.bin"))


def test_a_budget_smaller_than_the_remaps_is_cold() -> None:
    cold = plan(ORDERED, ORDER, 599)
    assert (cold.regime, cold.resident, cold.lookup_share) == (Regime.COLD, (), 0.0)
    assert "the budget does not hold the remaps" in cold.describe(Path("tables.bin"))


@pytest.mark.parametrize(
    "budget, a_rows, b_rows, lookups",
    [
        (600, 0, 0, 0),  # the remaps alone
        (600 + 8, 1, 0, 100),  # half of level 64: one of a's two rows, half its lookups
        (600 + 16, 2, 0, 200),  # level 64
        (600 + 96, 2, 5, 400),  # levels 64 and 32
        (600 + 256, 12, 10, 550),  # and 8
        (600 + 256 + 80, 22, 10, 565),  # and half of level 1
        (600 + 416, 32, 10, LOOKUPS),  # every row seen; those never seen are never populated
        (4000, 32, 10, LOOKUPS),
    ],
)
def test_a_frequency_ordered_file_keeps_its_remaps_and_hottest_prefixes_resident(
    budget: int, a_rows: int, b_rows: int, lookups: int
) -> None:
    partly = plan(ORDERED, ORDER, budget)
    prefixes = [(0, a_rows * 8)] * bool(a_rows) + [(896, b_rows * 16)] * bool(b_rows)
    assert partly.regime == Regime.PARTLY_RESIDENT
    assert partly.resident == (*prefixes, REMAPS)
    assert partly.resident_bytes <= budget
    assert partly.lookup_share == pytest.approx(lookups / LOOKUPS)
    line = partly.describe(Path("tables.bin"))
    assert line.startswith("tables.bin: partly resident: ") and f"{lookups / LOOKUPS:.1%} of the lookups" in line


@pytest.mark.parametrize(
    "text, size", [("4096", 4096), ("512M", 512 * 2**20), ("2GiB", 2 * 2**30), ("1 t", 2**40), ("7B", 7)]
)
def test_the_budget_variable_overrides_the_memory_the_kernel_reports(text: str, size: int) -> None:
    assert memory_budget({BUDGET_VARIABLE: text}) == MemoryBudget(size, BUDGET_VARIABLE)


@pytest.mark.parametrize("text", ["", "lots", "-1", "1.5G", "12 parsecs"])
def test_a_budget_that_is_no_size_is_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match=f"{BUDGET_VARIABLE} must be a number of bytes"):
        parse_size(text, BUDGET_VARIABLE)


def test_without_the_variable_the_budget_is_at_most_the_memory_available() -> None:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    budget = memory_budget({})
    assert budget.source in ("MemAvailable", "the cgroup's memory limit")
    assert 0 < budget.bytes <= available * 1.05  # MemAvailable moves while we read it


def _own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory directory, if it has one we may create groups in."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        directory = CGROUP_ROOT / "memory" / path.lstrip("/")
        if "memory" in controllers.split(",") and directory.is_dir() and os.access(directory, os.W_OK):
            return directory
    return None


_CHILD = (
    "import json; from model_factory.residency import memory_budget; "
    "budget = memory_budget({}); print(json.dumps([budget.bytes, budget.source]))"
)


@pytest.mark.skipif(_own_memory_cgroup() is None, reason="needs a writable cgroup v1 memory controller (root)")
def test_in_a_memory_limited_cgroup_the_budget_is_its_limit_less_what_the_group_holds_but_files() -> None:
    """A real child cgroup with a 768 MiB limit: the process in it (an interpreter that imported torch) gets a
    budget below the limit, and above it less that interpreter's own memory."""
    parent = _own_memory_cgroup()
    assert parent is not None
    group = parent / f"test-residency-{secrets.token_hex(4)}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(768 * 2**20))
        command = f'echo $$ > {group / "cgroup.procs"} && exec "$0" -c "$1"'
        result = subprocess.run(
            ["sh", "-c", command, sys.executable, _CHILD], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
    finally:
        group.rmdir()
    assert result.returncode == 0, result.stderr
    size, source = json.loads(result.stdout.splitlines()[-1])
    assert source == "the cgroup's memory limit"
    assert 256 * 2**20 < size < 768 * 2**20


def test_a_cgroup_v2_limit_is_the_lowest_on_the_way_to_the_root(tmp_path: Path) -> None:
    """cgroup v2 (the unified hierarchy, not mounted on this machine): the files as the kernel documents them,
    in a directory tree laid out as /sys/fs/cgroup, for a process in /workers/one."""
    group = tmp_path / "workers" / "one"
    group.mkdir(parents=True)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "workers" / "memory.max").write_text(f"{2 * 2**30}\n")
    (group / "memory.max").write_text("max\n")
    (group / "memory.current").write_text(f"{600 * 2**20}\n")
    (group / "memory.stat").write_text(f"anon {200 * 2**20}\nactive_file {300 * 2**20}\ninactive_file {100 * 2**20}\n")
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text("0::/workers/one\n")
    expected = 2 * 2**30 - 600 * 2**20 + 400 * 2**20  # the lowest limit, less what the group holds but files
    assert _cgroup_budget(tmp_path, proc_cgroup) == MemoryBudget(expected, "the cgroup's memory limit")
    (tmp_path / "workers" / "memory.max").write_text("max\n")
    assert _cgroup_budget(tmp_path, proc_cgroup) is None  # no limit on the way to the root
