"""Model updates on a real TorchServe: publish under load with no failed request, a refused bad version, rollback.

The server runs as an operator runs it for updates: model-management API and
token authorization on. The golden rows are labelled by version 1.0's own
scores (above the median: 1), so 1.0 and anything scoring like it rank them
perfectly, while a model with other weights ranks them at chance: the broken
update the gate must refuse.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from torchmetrics.functional.classification import binary_auroc

from model_archive.build import ArchiveFormat, BuildOptions, build_archive, read_golden_rows, score_in_process
from model_archive.contents import read_file
from model_archive.golden import GOLDEN_FILE, GoldenSet, auc
from model_factory.config import preset
from rollout.gate import GateLimits, evaluate
from rollout.publish import GateRefused, publish, rollback
from rollout.server import KEY_REFUSED, NoAnswer, RolloutError, TorchServe
from servers.load import SteadyLoad
from servers.torchserve import KEY_FILE, REPO_ROOT, Keys, TorchServeProcess, bearer
from tests.archives import TEST_MAX_ROWS
from training.synthetic import PlantedClickModel, format_tsv

GOLDEN_ROWS = 200
UPDATES = {"enable_model_api": "true", "disable_token_authorization": "false"}


def build(store: Path, name: str, version: str, seed: int, golden: Path | None) -> Path:
    options = BuildOptions(
        seed=seed,
        output=store / f"{name}.mar",
        version=version,
        archive_format=ArchiveFormat.UNZIPPED,
        golden_set=golden,
        golden_rows=GOLDEN_ROWS,
    )
    options = dataclasses.replace(options, serving=dataclasses.replace(options.serving, max_rows=TEST_MAX_ROWS))
    path, _ = build_archive(options)
    return path


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with dlrm-1.0, dlrm-1.1 (1.0's weights again) and dlrm-2.0 (other weights), golden sets included."""
    store = tmp_path_factory.mktemp("versions")
    work = tmp_path_factory.mktemp("golden")
    sample, _ = PlantedClickModel(seed=0).sample(GOLDEN_ROWS, np.random.default_rng(1))
    unlabelled = work / "unlabelled.tsv"
    unlabelled.write_text(format_tsv(sample))
    reference = build(work, "reference", "1.0", seed=0, golden=None)
    scores = score_in_process(reference, read_golden_rows(unlabelled, GOLDEN_ROWS, preset("small"))[0])
    golden = work / "golden.tsv"
    labels = (scores > np.median(scores)).astype(np.float32)
    golden.write_text(format_tsv(dataclasses.replace(sample, labels=labels)))
    for name, version, seed in (("dlrm-1.0", "1.0", 0), ("dlrm-1.1", "1.1", 0), ("dlrm-2.0", "2.0", 1)):
        build(store, name, version, seed, golden)
    return store


@pytest.fixture()
def updatable_server(versions: Path, tmp_path: Path) -> Iterator[TorchServeProcess]:
    with TorchServeProcess(versions, "dlrm=dlrm-1.0", tmp_path / "torchserve", overrides=UPDATES) as server:
        server.wait_ready()
        yield server


def test_golden_set_records_the_models_scores(versions: Path) -> None:
    golden = GoldenSet.from_json(read_file(versions / "dlrm-1.0", GOLDEN_FILE))
    assert len(golden.rows) == len(golden.labels) == GOLDEN_ROWS
    assert golden.auc == 1.0  # labelled by these very scores
    assert set(golden.rows[0]) == {f"int_{i}" for i in range(13)} | {f"cat_{i}" for i in range(26)}


def test_auc_equals_torchmetrics_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 500), np.round(rng.random(500), 1)  # many ties
    expected = float(binary_auroc(torch.as_tensor(scores), torch.as_tensor(labels)))
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-6)
    assert np.isnan(auc(np.ones(3, dtype=np.int64), scores[:3]))


def test_gate_verdicts() -> None:
    labels = np.array([0, 0, 1, 1])
    golden = GoldenSet(rows=[{}] * 4, labels=labels, scores=np.array([0.1, 0.2, 0.3, 0.4]))
    assert evaluate(golden, golden.scores, None, GateLimits()).passed
    assert not evaluate(golden, golden.scores + 1e-3, None, GateLimits()).passed  # serves other scores than built
    reversed_scores = np.array([0.4, 0.3, 0.2, 0.1])
    refused = evaluate(
        dataclasses.replace(golden, scores=reversed_scores), reversed_scores, golden.scores, GateLimits()
    )
    assert not refused.passed and "AUC 0.0000 vs current 1.0000" in str(refused)
    drifted = golden.scores + 0.1  # ranks the same, scores moved
    verdict = evaluate(dataclasses.replace(golden, scores=drifted), drifted, golden.scores, GateLimits())
    assert not verdict.passed and "mean |score change| 0.1000 (beyond 0.05)" in str(verdict)
    assert evaluate(
        dataclasses.replace(golden, scores=drifted), drifted, golden.scores, GateLimits(max_mean_drift=0.2)
    ).passed


def test_publish_refuse_and_rollback_under_load(
    updatable_server: TorchServeProcess, versions: Path, record_property: Callable[[str, object], None]
) -> None:
    keys = updatable_server.keys()
    endpoints = updatable_server.endpoints
    server = TorchServe(endpoints.management, endpoints.inference, keys)
    # Token authorization guards the management API: no key, no update.
    unauthorized = requests.get(f"{endpoints.management}/models", timeout=10)
    assert unauthorized.status_code == 400 and "Token Authorization failed" in unauthorized.text, unauthorized.text
    with pytest.raises(RolloutError, match="Token Authorization failed"):
        TorchServe(endpoints.management, endpoints.inference).versions("dlrm")

    row = {"float_features": [0.5] * 13, "id_list_features.lengths": [1] * 26, "id_list_features.values": [0] * 26}
    body = json.dumps(row).encode()
    old_workers = set(updatable_server.worker_pids())
    with SteadyLoad(f"{endpoints.inference}/predictions/dlrm", body, clients=4, headers=bearer(keys.inference)) as load:
        load.wait_for(lambda outcomes: sum(o.ok for o in outcomes) > 20, timeout=60)
        switch = publish(server, versions, "dlrm-1.1")
        assert (switch.old, switch.new) == ("1.0", "1.1") and switch.verdict.passed, switch.verdict
        assert [(s.version, s.default) for s in server.versions("dlrm")] == [("1.1", True)]
        assert _all_exit(old_workers, timeout=30), "the retired version's workers still run"

        with pytest.raises(GateRefused, match="AUC") as refused:
            publish(server, versions, "dlrm-2.0")
        assert "refused" in str(refused.value)
        assert [(s.version, s.default) for s in server.versions("dlrm")] == [("1.1", True)]

        back = rollback(server, versions)
        assert (back.old, back.new) == ("1.1", "1.0")
        assert server.default_version("dlrm") == "1.0"
        with pytest.raises(RolloutError, match="no archive of version 9.9"):
            rollback(server, versions, to="9.9")
        with pytest.raises(RolloutError, match="is not a readable model archive"):
            publish(server, versions, "dlrm-9.9")
        with pytest.raises(RolloutError, match="dlrm 1.0 is already the default version"):
            publish(server, versions, "dlrm-1.0")
        served = len(load.outcomes())
        load.wait_for(lambda outcomes: len(outcomes) > served + 20, timeout=60)
    outcomes = load.outcomes()
    failed = [outcome for outcome in outcomes if not outcome.ok]
    record_property("requests_during_updates", len(outcomes))
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed during the updates: {failed[:3]}"
    server.close()


def _all_exit(pids: set[int], timeout: float) -> bool:
    """Whether every process exits (or is a zombie, its memory freed) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def startup_probe(archive: Path, server: TorchServeProcess) -> subprocess.CompletedProcess:
    """The Deployment's startup probe, aimed at a test server and archive instead of the pod's."""
    deployment = yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    (container,) = next(doc for doc in deployment if doc["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    shell, flag, script = container["startupProbe"]["exec"]["command"]
    prefix = "cd /opt/dlrm && exec python -m rollout check --archive model_store/dlrm.mar"
    assert (shell, flag, script) == ("sh", "-c", prefix)
    command = [sys.executable, "-m", "rollout", "check", "--archive", str(archive)]
    command += ["--inference", server.endpoints.inference, "--key-file", str(server.workdir / "key_file.json")]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_startup_probe_passes_the_served_archive_only(updatable_server: TorchServeProcess, versions: Path) -> None:
    served = startup_probe(versions / "dlrm-1.0", updatable_server)
    assert served.returncode == 0, served.stderr
    assert "passed: served vs built scores: max |diff|" in served.stdout
    other = startup_probe(versions / "dlrm-2.0", updatable_server)  # a version this server does not serve
    assert other.returncode == 1 and "scoring the golden set on dlrm 2.0: 404" in other.stderr, other.stderr


def test_wait_ready_uses_the_key_file_under_token_authorization(updatable_server: TorchServeProcess) -> None:
    """``python -m servers.torchserve wait-ready`` against a server with token authorization: with its key file it
    sees the worker READY; without, every describe call is refused and it gives up at its timeout."""
    command = [sys.executable, "-m", "servers.torchserve", "wait-ready", "--management"]
    command += [updatable_server.endpoints.management, "--timeout", "2"]
    keyed = subprocess.run(
        [*command, "--key-file", str(updatable_server.workdir / "key_file.json")], cwd=REPO_ROOT, timeout=60
    )
    assert keyed.returncode == 0
    unkeyed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert unkeyed.returncode != 0 and "is not ready" in unkeyed.stderr


def rollout_cli(server: TorchServeProcess, key_file: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m rollout ARGS`` against ``server``, as an operator runs it."""
    endpoints = ["--management", server.endpoints.management, "--inference", server.endpoints.inference]
    command = [sys.executable, "-m", "rollout", *args, *endpoints, "--key-file", str(key_file)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def client(server: TorchServeProcess) -> TorchServe:
    """A rollout client of ``server`` that reads its key file (and renews expired keys)."""
    return TorchServe(server.endpoints.management, server.endpoints.inference, key_file=server.workdir / KEY_FILE)


def registered(server: TorchServe) -> list[tuple[str, bool]]:
    return [(state.version, state.default) for state in server.versions("dlrm")]


def test_expired_keys_are_renewed(versions: Path, tmp_path: Path) -> None:
    """Keys that expire 3 s after TorchServe writes them: ``python -m rollout`` renews them through TorchServe's token
    API (TorchServe renews nothing by itself), and a publish outlives several expiries."""
    overrides = {**UPDATES, "token_expiration_min": "0.05"}  # TorchServe reads a double: 3 s
    with TorchServeProcess(versions, "dlrm=dlrm-1.0", tmp_path / "torchserve", overrides=overrides) as process:
        key_file = process.workdir / KEY_FILE
        deadline = time.monotonic() + 120
        while not _ready(process):  # renews the keys on the way
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.5)
        server = client(process)

        expired = _wait_until_expired(key_file)
        refused = requests.get(f"{process.endpoints.management}/models", headers=bearer(expired.management), timeout=10)
        assert refused.status_code == 400 and KEY_REFUSED in refused.text
        status = rollout_cli(process, key_file, "status")
        assert status.returncode == 0, status.stderr
        assert status.stdout == "dlrm 1.0 (default): 2 ready workers\n"
        renewed = Keys.from_key_file(key_file)
        assert renewed.management != expired.management and renewed.api == expired.api

        _wait_until_expired(key_file)
        switch = publish(server, versions, "dlrm-1.1", drain_grace_s=4.0)  # the keys expire again on the way
        assert switch.new == "1.1" and switch.verdict.passed
        assert registered(server) == [("1.1", True)]
        server.close()


def _ready(process: TorchServeProcess) -> bool:
    """Whether a worker of dlrm is READY, asked by a rollout client (TorchServeProcess.wait_ready cannot renew keys)."""
    if not process.keys().management:
        return False  # no key file yet
    server = client(process)
    try:
        return any(state.ready_workers for state in server.versions("dlrm"))
    except NoAnswer:  # the key file is written before the APIs listen
        return False
    finally:
        server.close()


def _wait_until_expired(key_file: Path) -> Keys:
    """The keys of ``key_file`` once both have expired."""
    content = json.loads(key_file.read_text())
    expiry = max(datetime.fromisoformat(content[api]["expiration time"]) for api in ("management", "inference"))
    time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 0.2)
    return Keys.from_key_file(key_file)


def test_publish_past_its_register_timeout_leaves_the_server_as_it_was(
    updatable_server: TorchServeProcess, versions: Path
) -> None:
    """A registration slower than ``--register-timeout`` goes on in TorchServe after the client gave up; the failed
    publish unregisters the version all the same, and says what failed."""
    key_file = updatable_server.workdir / KEY_FILE
    failed = rollout_cli(updatable_server, key_file, "publish", "dlrm-1.1", "--model-store", str(versions),
                         "--register-timeout", "0.05")  # fmt: skip
    assert failed.returncode == 1
    assert failed.stderr.startswith("rollout: POST /models: ") and "timed out" in failed.stderr, failed.stderr
    # TorchServe answers the registration (to nobody) once its workers are up: only then is the outcome final.
    access_log = updatable_server.log_dir / "access_log.log"
    deadline = time.monotonic() + 120
    while '"POST /models?url=dlrm-1.1&' not in access_log.read_text():
        assert time.monotonic() < deadline, updatable_server.log_tail()
        time.sleep(0.2)
    server = client(updatable_server)
    assert registered(server) == [("1.0", True)]
    server.close()


def renew_management_key_once_registering(process: TorchServeProcess, version: str) -> None:
    """Another client renews TorchServe's management key the moment ``version`` shows up, while it registers."""
    management = process.endpoints.management
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        keys = process.keys()
        described = requests.get(f"{management}/models/dlrm/all", headers=bearer(keys.management), timeout=10)
        if described.ok and any(entry["modelVersion"] == version for entry in described.json()):
            renewal = requests.get(
                f"{management}/token", params={"type": "management"}, headers=bearer(keys.api), timeout=10
            )
            assert renewal.status_code == 200, renewal.text
            return
        time.sleep(0.01)
    raise TimeoutError(f"dlrm {version} never showed up")


def test_a_failed_publish_reports_its_own_error_and_cleans_up(
    updatable_server: TorchServeProcess, versions: Path, tmp_path: Path
) -> None:
    """The management key changes while a refused version registers. Reading the key file, the publish still
    unregisters it. With a copy of the key file, whose keys cannot be renewed, the user sees the gate's refusal,
    and a note that the version is still registered (and why), not the cleanup's error in its place."""
    server = client(updatable_server)
    with ThreadPoolExecutor(1) as pool:
        renewed = pool.submit(renew_management_key_once_registering, updatable_server, "2.0")
        with pytest.raises(GateRefused, match="AUC") as refused:
            publish(server, versions, "dlrm-2.0")
        renewed.result()
    assert not getattr(refused.value, "__notes__", None)
    assert registered(server) == [("1.0", True)]

    copy = tmp_path / "copied_key_file.json"
    copy.write_text((updatable_server.workdir / KEY_FILE).read_text())
    with ThreadPoolExecutor(1) as pool:
        renewed = pool.submit(renew_management_key_once_registering, updatable_server, "2.0")
        failed = rollout_cli(updatable_server, copy, "publish", "dlrm-2.0", "--model-store", str(versions))
        renewed.result()
    assert failed.returncode == 1
    first, *notes = failed.stderr.splitlines()
    assert first.startswith("rollout: dlrm 2.0 refused: ") and "AUC" in first, failed.stderr
    assert len(notes) == 1, failed.stderr
    assert notes[0].startswith("and dlrm 2.0 may still be registered: removing it failed: "), notes
    assert f"{copy} is not the key file of this TorchServe" in notes[0], notes
    assert registered(server) == [("1.0", True), ("2.0", False)]  # as the note says
    server.unregister("dlrm", "2.0")
    assert registered(server) == [("1.0", True)]
    server.close()
