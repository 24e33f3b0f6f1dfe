"""Quantized tables mapped, not loaded: tables.bin in FBGEMM's CPU layout, mapped read-only and shared.

The file is each TBE's ``weights_host`` in turn; loading on CPU maps it
(``MAP_SHARED``, ``PROT_READ``) and hands the mapping to the TBEs. These tests
check the layout, that mapped and copied tables score identically, that the
file is never written, that bad files are refused with a clear error, that
format-1 archives are refused with one saying to rebuild them, and (``test_two_processes_share_one_copy_of_the_tables``)
that two processes mapping one archive share the page cache's copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.predictor import DLRMPredictor
from model_factory import quantization, residency, tbe
from model_factory.artifact import (
    CONFIG_FILE,
    TABLES_FILE,
    ModelArtifact,
    Provenance,
    load_model,
    read_artifact,
    write_artifact,
)
from model_factory.config import ConfigError, DLRMConfig, preset
from model_factory.factory import build_dlrm, init_weights, summarize, table_name
from model_factory.features import rows_to_kjt
from model_factory.quantization import MlpDtype, QuantizationSpec, TableDtype, quantize_model_tables
from model_factory.random_tables import random_quantized_model
from model_factory.row_order import FrequencyOrder, row_order
from model_factory.tbe import empty_quantized_collection, map_tables, table_file_layout, table_views
from servers.torchserve import REPO_ROOT
from tests.archives import QUANTIZATION_SPECS
from training.synthetic import random_inputs, request_rows

SPECS = QUANTIZATION_SPECS
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def padded_config() -> DLRMConfig:
    """Rows that need padding (dimension 6: int8 rows of 10 bytes, int4 of 7) and tables that end off a cache line."""
    return DLRMConfig(
        num_embeddings_per_feature=(1001, 333, 77, 2048),
        embedding_dim=6,
        dense_arch_layer_sizes=(8, 6),
        over_arch_layer_sizes=(8, 1),
        dense_feature_names=("int_0", "int_1"),
        sparse_feature_names=("cat_0", "cat_1", "cat_2", "cat_3"),
    )


@pytest.fixture(params=["small", "padded"])
def config(request: pytest.FixtureRequest, small_config: DLRMConfig, padded_config: DLRMConfig) -> DLRMConfig:
    return small_config if request.param == "small" else padded_config


def scores(model, config: DLRMConfig, seed: int = 0, rows: int = 64) -> torch.Tensor:
    dense, lengths, values = random_inputs(config, rows, np.random.default_rng(seed), num_indices_per_lookup=3)
    with torch.inference_mode():
        logits = model(torch.from_numpy(dense), rows_to_kjt(config.sparse_feature_names, lengths, values))
    return torch.sigmoid(logits.squeeze(1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file of ``directory``: size, modification time and hash."""
    return {
        path.name: (path.stat().st_size, path.stat().st_mtime_ns, sha256(path))
        for path in sorted(directory.iterdir())
        if path.is_file()
    }


def write_quantized(directory: Path, config: DLRMConfig, spec: QuantizationSpec, seed: int = 1):
    """A quantized artifact; returns its model.

    From seeded fp32 weights, as build_mar.py quantizes a checkpoint, where
    TorchRec's quantization can (int4 needs whole fp16 words of codes:
    dimensions that are multiples of 4); else random quantized tables, as
    build_mar.py creates an untrained archive.
    """
    if config.embedding_dim % 4 == 0:
        model = quantize_model_tables(init_weights(build_dlrm(config), seed=seed), config, spec)
    else:
        model = init_weights(random_quantized_model(config, spec, seed), seed)
    write_artifact(directory, ModelArtifact(config, Provenance(trained=False, seed=seed), quantization=spec), model)
    if spec.mlp == MlpDtype.INT8:  # as load_model does: the artifact holds fp32 MLPs
        quantization.quantize_mlps(model)
    return model.eval()


def mapped_lines(path: Path) -> list[str]:
    """This process's mappings of ``path`` (lines of /proc/self/maps)."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(" " + str(path))]


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "int4", "mixed"])
def test_the_table_file_is_each_tbes_weights_host_in_turn(name: str, config: DLRMConfig, tmp_path: Path) -> None:
    spec = SPECS[name]
    model = write_quantized(tmp_path, config, spec)
    modules = model.sparse_arch.embedding_bag_collection._emb_modules
    assert all(module.row_alignment == quantization.CPU_ROW_ALIGNMENT for module in modules)
    hosts = b"".join(module.weights_host.numpy().tobytes() for module in modules)
    assert (tmp_path / TABLES_FILE).read_bytes() == hosts
    recorded = json.loads((tmp_path / CONFIG_FILE).read_text())["table_file"]
    layout = table_file_layout(config, spec)
    assert recorded == layout.to_dict() and recorded["size"] == len(hosts)
    assert [part["size"] for part in recorded["tbes"]] == [module.host_size for module in modules]
    assert [[t["offset"] for t in part["tables"]] for part in recorded["tbes"]] == [
        module.weights_physical_offsets for module in modules
    ]
    if config.embedding_dim == 6 and name in ("int8", "int4"):  # the padded config really pads
        assert {t["stride"] - t["row_bytes"] for t in recorded["tbes"][0]["tables"]} == {2 if name == "int8" else 1}


def test_the_criteo_1tb_int8_table_file_is_one_tbe_of_cache_line_aligned_tables() -> None:
    config = preset("criteo-1tb")
    layout = table_file_layout(config, QuantizationSpec(TableDtype.INT8))
    (part,) = layout.tbes
    assert {(table.row_bytes, table.stride) for table in part.tables} == {(68, 68)}
    assert all(table.offset % 128 == 0 for table in part.tables)
    unpadded = sum(rows * 68 for rows in config.num_embeddings_per_feature)
    assert unpadded <= layout.size < unpadded + 128 * len(part.tables)
    assert layout.size / 2**30 == pytest.approx(11.27, abs=0.01)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_mapped_tables_score_exactly_as_copied_ones(name: str, config: DLRMConfig, tmp_path: Path) -> None:
    spec = SPECS[name]
    original = write_quantized(tmp_path, config, spec)
    before = snapshot(tmp_path)
    mapped, _ = load_model(tmp_path)
    copied, _ = load_model(tmp_path, copy_tables=True)
    mapped_tables = mapped.sparse_arch.embedding_bag_collection
    # The TBEs read the mapping itself: read-only, shared, the file's first byte at the first TBE's first byte.
    (line,) = mapped_lines(tmp_path / TABLES_FILE)
    assert line.split()[1] == "r--s"
    start = int(line.split("-")[0], 16)
    assert mapped_tables._emb_modules[0].weights_host.data_ptr() == start
    views, copied_views = table_views(mapped_tables), table_views(copied.sparse_arch.embedding_bag_collection)
    assert all(torch.equal(views[table], copied_views[table]) for table in views)
    reference = scores(copied, config)
    assert torch.equal(scores(mapped, config), reference)
    assert torch.equal(scores(original, config), reference)
    assert snapshot(tmp_path) == before


def test_a_mapped_collection_is_the_allocated_one_but_for_where_the_weights_live(
    padded_config: DLRMConfig, tmp_path: Path
) -> None:
    """The CPU TBEs built for the mapping get exactly the arguments TorchRec gives its own."""
    spec = SPECS["mixed"]
    write_quantized(tmp_path, padded_config, spec)
    layout = table_file_layout(padded_config, spec)
    mapped = map_tables(padded_config, spec, layout, tmp_path / TABLES_FILE)
    allocated = empty_quantized_collection(padded_config, spec, CPU)
    for name in ("_feature_names", "_feature_splits", "_length_per_key", "_embedding_names", "device"):
        assert getattr(mapped, name) == getattr(allocated, name), name
    mapped_state, allocated_state = mapped.state_dict(), allocated.state_dict()
    assert list(mapped_state) == list(allocated_state)
    for key, value in mapped_state.items():
        assert type(value) is type(allocated_state[key]) and value.shape == allocated_state[key].shape, key
    assert len(mapped._emb_modules) == len(allocated._emb_modules)
    for ours, theirs in zip(mapped._emb_modules, allocated._emb_modules, strict=True):
        for name in (
            "embedding_specs", "feature_table_map", "row_alignment", "use_cpu", "current_device", "pooling_mode",
            "output_dtype", "bounds_check_mode_int", "scale_bias_size_in_bytes", "total_D", "host_size",
            "dev_size", "uvm_size", "weights_physical_offsets", "weights_physical_placements", "weight_initialized",
            "max_int2_D", "max_int4_D", "max_int8_D", "max_float8_D", "max_float16_D", "max_float32_D",
            "reverse_qparam", "total_cache_hash_size",
        ):  # fmt: skip
            assert getattr(ours, name) == getattr(theirs, name), name
        for name in ("weights_offsets", "weights_placements", "weights_dev", "weights_uvm"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
        ours_buffers, theirs_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
        assert list(ours_buffers) == list(theirs_buffers)
        assert all(torch.equal(ours_buffers[k], theirs_buffers[k]) for k in ours_buffers)
        assert ours.weights_host.shape == theirs.weights_host.shape
    # state_dict's per-table views and the summary see the mapping, not a stale allocation.
    host = mapped._emb_modules[0].weights_host
    for key, value in mapped_state.items():
        data = value.elem if hasattr(value, "elem") else value  # UInt4Tensor wraps the bytes
        assert host.data_ptr() <= data.data_ptr() < host.data_ptr() + host.numel(), key
    model = build_dlrm(padded_config)
    model.sparse_arch.embedding_bag_collection = mapped
    sparse = {row.name: row for row in summarize(model)}["sparse_arch"]
    assert sparse.bytes == layout.size


def test_the_gpu_path_streams_the_cpu_layout_into_other_row_alignments(
    padded_config: DLRMConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On GPU FBGEMM keeps 16-byte rows: simulated on CPU, the streamed tables score as the mapped ones."""
    spec = SPECS["mixed"]
    write_quantized(tmp_path, padded_config, spec)
    mapped, _ = load_model(tmp_path)
    monkeypatch.setattr(tbe, "row_alignment", lambda device: quantization.GPU_ROW_ALIGNMENT)
    streamed, _ = load_model(tmp_path, copy_tables=True)
    assert streamed.sparse_arch.embedding_bag_collection._emb_modules[0].row_alignment == 16
    assert torch.equal(scores(streamed, padded_config), scores(mapped, padded_config))


def test_loading_and_serving_in_process_never_writes_the_model_directory(
    small_config: DLRMConfig, tmp_path: Path
) -> None:
    spec = SPECS["int8+mlp"]
    write_quantized(tmp_path, small_config, spec)
    before = snapshot(tmp_path)
    predictor = DLRMPredictor.from_artifact(tmp_path, CPU)
    rows = list(request_rows(*random_inputs(small_config, 32, np.random.default_rng(2), num_indices_per_lookup=4)))
    for _ in range(3):
        result = predictor.predict_bodies([json.dumps({"instances": rows})] * 4)
        assert all(response.status == 200 for response in result.responses)
    (line,) = mapped_lines(tmp_path / TABLES_FILE)
    assert line.split()[1] == "r--s"
    assert snapshot(tmp_path) == before
    del predictor


def write_ordered(directory: Path, spec: QuantizationSpec, config: DLRMConfig | None = None, seed: int = 1) -> Path:
    """A frequency-ordered artifact of random quantized tables: every table's counts a reversed ``arange``, so
    its rows are stored last id first."""
    config = config or preset("small")
    counts = {
        table_name(feature): torch.arange(rows, dtype=torch.int64).flip(0)
        for feature, rows in zip(config.sparse_feature_names, config.num_embeddings_per_feature, strict=True)
    }
    artifact = ModelArtifact(
        config, Provenance(trained=False, seed=seed), quantization=spec, frequency_order=FrequencyOrder.of(counts)
    )
    write_artifact(directory, artifact, random_quantized_model(config, spec, seed), lambda t: row_order(counts[t.name]))
    return directory


@pytest.mark.parametrize("name", ["int8", "mixed"])
def test_a_frequency_ordered_file_s_remap_is_mapped_too(name: str, padded_config: DLRMConfig, tmp_path: Path) -> None:
    """The remap FBGEMM maps ids through is the file's, mapped like the rows (shared, not copied), and holds
    exactly what FBGEMM's own set_index_remappings_array sets when the file is copied instead."""
    directory = write_ordered(tmp_path, SPECS[name], padded_config)
    before = snapshot(directory)
    mapped, artifact = load_model(directory)
    copied, _ = load_model(directory, copy_tables=True)
    (line,) = mapped_lines(directory / TABLES_FILE)
    start, end = (int(address, 16) for address in line.split()[0].split("-"))
    for ours, theirs, part in zip(
        mapped.sparse_arch.embedding_bag_collection._emb_modules,
        copied.sparse_arch.embedding_bag_collection._emb_modules,
        artifact.table_file().tbes,
        strict=True,
    ):
        assert part.remap_offset is not None
        assert ours.index_remappings_array.data_ptr() == start + part.remap_offset < end
        for buffer in ("index_remappings_array", "index_remappings_array_offsets", "original_rows_per_table"):
            assert torch.equal(getattr(ours, buffer), getattr(theirs, buffer)), buffer
        assert ours.index_remappings_array.dtype == theirs.index_remappings_array.dtype == torch.int32
    assert torch.equal(scores(mapped, padded_config), scores(copied, padded_config))
    assert snapshot(directory) == before


def test_a_mapping_outlives_the_extracted_directory(small_config: DLRMConfig, tmp_path: Path) -> None:
    """A zipped archive is extracted to a temporary directory and removed: the mapping keeps the tables."""
    directory = tmp_path / "extracted"
    write_quantized(directory, small_config, SPECS["int4"])
    model, _ = load_model(directory)
    reference = scores(model, small_config)
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    assert torch.equal(scores(model, small_config), reference)


# Integrity: every way the table file can disagree with model_config.json is a ConfigError naming the file.


@pytest.fixture()
def int8_artifact(padded_config: DLRMConfig, tmp_path: Path) -> Path:
    directory = tmp_path / "artifact"
    write_quantized(directory, padded_config, SPECS["int8"])
    return directory


@pytest.mark.parametrize("copy_tables", [False, True], ids=["mapped", "copied"])
@pytest.mark.parametrize("change", ["truncated", "empty", "one byte too long", "a page too long"])
def test_a_table_file_of_the_wrong_size_is_refused(int8_artifact: Path, change: str, copy_tables: bool) -> None:
    path = int8_artifact / TABLES_FILE
    expected = path.stat().st_size
    new_size = {"truncated": expected // 2, "empty": 0, "one byte too long": expected + 1}.get(change, expected + 4096)
    with open(path, "r+b") as tables:
        tables.truncate(new_size)
    message = f"{path} holds {new_size} bytes, the archive's table layout needs {expected}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_model(int8_artifact, copy_tables=copy_tables)


@pytest.mark.parametrize("copy_tables", [False, True], ids=["mapped", "copied"])
def test_a_missing_table_file_is_refused(int8_artifact: Path, copy_tables: bool) -> None:
    path = int8_artifact / TABLES_FILE
    expected = path.stat().st_size
    path.unlink()
    with pytest.raises(ConfigError, match=re.escape(f"the table file {path} ({expected} bytes expected)")):
        load_model(int8_artifact, copy_tables=copy_tables)


def _edit_config(directory: Path, edit) -> None:
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_table_file_not_laid_out_as_recorded_is_refused(int8_artifact: Path) -> None:
    """A recorded layout this FBGEMM does not build (another row alignment, say) names the file and both sizes."""
    path = int8_artifact / TABLES_FILE
    expected = path.stat().st_size

    def realign(data: dict) -> None:
        layout = data["table_file"]
        layout["row_alignment"] = 8
        for table in layout["tbes"][0]["tables"]:
            table["stride"] = 16
        layout["tbes"][0]["size"] += 128
        layout["size"] += 128

    _edit_config(int8_artifact, realign)
    for copy_tables in (False, True):
        with pytest.raises(
            ConfigError, match=rf"{re.escape(str(path))} as {expected + 128} bytes .* as {expected} bytes"
        ):
            load_model(int8_artifact, copy_tables=copy_tables)


def test_an_inconsistent_or_missing_recorded_layout_is_refused(int8_artifact: Path) -> None:
    def wrong_total(data: dict) -> None:
        data["table_file"]["size"] += 1

    _edit_config(int8_artifact, wrong_total)
    with pytest.raises(ConfigError, match="cannot read model artifact .*size"):
        load_model(int8_artifact)
    _edit_config(int8_artifact, lambda data: data.pop("table_file"))
    expected = (int8_artifact / TABLES_FILE).stat().st_size
    with pytest.raises(ConfigError, match=rf"records no layout for .*{TABLES_FILE} \({expected} bytes expected\)"):
        load_model(int8_artifact)


def test_unknown_format_versions_are_refused(int8_artifact: Path) -> None:
    _edit_config(int8_artifact, lambda data: data.update(format_version=4))
    with pytest.raises(ConfigError, match="unsupported artifact format_version 4; expected 2 or 3.*rebuild"):
        load_model(int8_artifact)


def test_format_3_is_the_frequency_ordered_format_and_only_it(int8_artifact: Path, tmp_path: Path) -> None:
    """A reader of format 2 would serve a frequency-ordered file's rows by the wrong ids: such files are format 3,
    and a format that disagrees with the presence of the frequency order is refused."""
    _edit_config(int8_artifact, lambda data: data.update(format_version=3))
    with pytest.raises(ConfigError, match="format_version 3 without a frequency_order"):
        load_model(int8_artifact)
    ordered = write_ordered(tmp_path / "ordered", SPECS["int8"])
    _edit_config(ordered, lambda data: data.update(format_version=2))
    with pytest.raises(ConfigError, match="format_version 2 with a frequency_order"):
        load_model(ordered)


def test_format_1_archives_are_refused_saying_to_rebuild_them(padded_config: DLRMConfig, tmp_path: Path) -> None:
    """A format-1 archive (tables.bin of unpadded rows, one table after the other, no recorded layout) is no
    longer read: mapped or copied, loading names the format and says to rebuild it."""
    spec = SPECS["int8"]
    original = write_quantized(tmp_path, padded_config, spec)
    views = table_views(original.sparse_arch.embedding_bag_collection)
    unpadded = b"".join(views[table_name(feature)].numpy().tobytes() for feature in padded_config.sparse_feature_names)
    (tmp_path / TABLES_FILE).write_bytes(unpadded)

    def downgrade(data: dict) -> None:
        data["format_version"] = 1
        del data["table_file"]

    _edit_config(tmp_path, downgrade)
    for copy_tables in (False, True):
        with pytest.raises(ConfigError, match=r"unsupported artifact format_version 1; .*rebuild the archive"):
            load_model(tmp_path, copy_tables=copy_tables)
    assert mapped_lines(tmp_path / TABLES_FILE) == []


# Sharing: two processes, one copy. About 15 s, mostly two interpreters importing torch and TorchRec.

_CHILD = """
import sys
import time
from pathlib import Path
from model_factory.artifact import load_model
model, _ = load_model(Path(sys.argv[1]))
# Read every byte of every TBE's weights: every page of the mapping resident in this process.
print(sum(int(module.weights_host.sum()) for module in model.sparse_arch.embedding_bag_collection._emb_modules))
sys.stdout.flush()
sys.stdin.read()  # hold the mapping until the test has measured it
"""


def _file_mapping_kib(pid: int, path: Path) -> dict[str, int]:
    """Rss and Pss (KiB) of process ``pid``'s mappings of ``path``, from /proc/<pid>/smaps."""
    totals = {"Rss": 0, "Pss": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = line.endswith(" " + str(path))
        elif inside and fields[0].rstrip(":") in totals:
            totals[fields[0].rstrip(":")] += int(fields[1])
    return totals


def one_table_config(rows: int) -> DLRMConfig:
    """One table of ``rows`` rows of dimension 64: a table file of ``rows`` x 68 bytes in int8."""
    return DLRMConfig(
        num_embeddings_per_feature=(rows,),
        embedding_dim=64,
        dense_arch_layer_sizes=(64,),
        over_arch_layer_sizes=(4, 1),
        dense_feature_names=("int_0",),
        sparse_feature_names=("cat_0",),
    )


def test_two_processes_share_one_copy_of_the_tables(tmp_path: Path) -> None:
    """SHARING (two subprocesses, ~15 s): each maps a 68 MiB int8 table file and reads all of it; each is
    resident in full (Rss) while their proportional shares (Pss) add up to one copy."""
    config = one_table_config(2**20)
    spec = QuantizationSpec(TableDtype.INT8)
    write_artifact(
        tmp_path,
        ModelArtifact(config, Provenance(False, 0), quantization=spec),
        random_quantized_model(config, spec, 0),
    )
    path = tmp_path / TABLES_FILE
    size_kib = path.stat().st_size / 1024
    assert size_kib >= 64 * 1024
    digest = sha256(path)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path)],
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        sums = [child.stdout.readline().strip() for child in children]  # type: ignore[union-attr]
        assert sums[0] == sums[1] and int(sums[0]) > 0, sums
        usage = [_file_mapping_kib(child.pid, path) for child in children]
    finally:
        for child in children:
            child.communicate(timeout=30)
    for one in usage:
        assert one["Rss"] == pytest.approx(size_kib, rel=0.01), usage  # every page resident in both
        assert one["Pss"] == pytest.approx(size_kib / 2, rel=0.15), usage  # each charged half
    assert usage[0]["Pss"] + usage[1]["Pss"] == pytest.approx(size_kib, rel=0.15), usage  # one copy in all
    assert all(child.returncode == 0 for child in children)
    assert sha256(path) == digest


def test_a_mapping_is_populated_in_the_background(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every page of the mapped tables becomes resident in the loading process without a lookup touching it."""
    config = one_table_config(2**18)
    write_quantized(tmp_path, config, SPECS["int8"])
    path = tmp_path / TABLES_FILE
    pages_kib = -(-path.stat().st_size // 4096) * 4
    with caplog.at_level(logging.INFO, logger=residency.__name__):
        model, _ = load_model(tmp_path)
    assert f"{path}: fits: all 17.0 MiB populated in the background; memory budget" in caplog.text
    deadline = time.monotonic() + 30
    while _file_mapping_kib(os.getpid(), path)["Rss"] < pages_kib and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _file_mapping_kib(os.getpid(), path)["Rss"] == pages_kib
    del model


def _vmas(path: Path) -> list[tuple[int, int, int, set[str]]]:
    """This process's mappings of ``path``, one per VMA: start, end, resident bytes and VmFlags (smaps)."""
    vmas: list[tuple[int, int, int, set[str]]] = []
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = line.endswith(" " + str(path))
            if inside:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                vmas.append((start, end, 0, set()))
        elif inside and fields[0] == "Rss:":
            vmas[-1] = (*vmas[-1][:2], int(fields[1]) * 1024, vmas[-1][3])
        elif inside and fields[0] == "VmFlags:":
            vmas[-1][3].update(fields[1:])
    return vmas


@pytest.mark.parametrize("ordered", [True, False], ids=["frequency-ordered", "id-ordered"])
def test_a_file_larger_than_the_budget_keeps_its_hottest_rows_resident_and_the_rest_on_disk(
    ordered: bool, small_config: DLRMConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """With a budget of a third of the file (the environment override): a frequency-ordered file populates its
    remap and the hottest prefix of each table, an id-ordered one nothing, and what is not populated is advised
    MADV_RANDOM (smaps' ``rr``): no readahead. The pages outside the populated ranges stay unmapped."""
    if ordered:
        write_ordered(tmp_path, SPECS["int8"])
    else:
        write_quantized(tmp_path, small_config, SPECS["int8"])
    path = tmp_path / TABLES_FILE
    artifact = read_artifact(tmp_path)
    budget = residency.MemoryBudget(path.stat().st_size // 3, residency.BUDGET_VARIABLE)
    monkeypatch.setenv(residency.BUDGET_VARIABLE, str(budget.bytes))
    with caplog.at_level(logging.INFO, logger=residency.__name__):
        model, _ = load_model(tmp_path)
    plan = residency.plan_residency(artifact.table_file(), artifact.frequency_order, budget)
    assert plan.regime == (residency.Regime.PARTLY_RESIDENT if ordered else residency.Regime.COLD)
    assert plan.describe(path) in caplog.text
    base = _vmas(path)[0][0]
    page = 4096
    hot = {
        address
        for offset, length in plan.resident
        for address in range(base + offset // page * page, base + offset + length, page)
    }
    deadline = time.monotonic() + 30
    while sum(rss for *_, rss, flags in _vmas(path) if "rr" not in flags) < len(hot) * page:
        assert time.monotonic() < deadline, _vmas(path)
        time.sleep(0.05)
    for start, end, rss, flags in _vmas(path):
        pages = set(range(start, end, page))
        if pages <= hot:
            assert "rr" not in flags and rss == end - start
        else:
            assert not pages & hot and "rr" in flags and rss == 0
    assert bool(hot) == ordered
    assert torch.equal(scores(model, small_config), scores(load_model(tmp_path, copy_tables=True)[0], small_config))
