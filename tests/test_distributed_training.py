"""torchrun training with sharded tables (2 gloo ranks on CPU), DCP checkpoints and their conversion into archives.

The runs are real: ``torchrun --standalone --nproc-per-node 2 -m training.train``
and the one-process ``python -m training.train`` on the same planted data, one
global batch of 512 rows per step in both (256 per rank on two ranks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torchrec.models.dlrm import DLRMTrain

from model_archive.checkpoint import match_checkpoint
from model_archive.contents import extracted
from model_factory.artifact import WEIGHTS_FILE, load_model, read_artifact
from model_factory.config import DLRMConfig, preset
from model_factory.factory import build_dlrm, init_weights, load_weights
from model_factory.features import Preprocessing
from servers.torchserve import LOOPBACK, TorchServeProcess, free_port
from tests.archives import build_archive, served_weights
from tests.rows import raw_request_row
from training.checkpoint import checkpoint_dirs, latest_checkpoint
from training.criteo import read_batches
from training.synthetic import PlantedClickModel, write_tsv
from training.train import parse_args

GLOBAL_BATCH = 512
STEPS = 40
CHECKPOINT_EVERY = 15
TOLERANCE = 1e-5
# Loss and AUC of the two-rank run against the one-rank run: they train the same model on the same global batches.
METRIC_TOLERANCE = 1e-4
# A rank killed by a signal (an abort in C++) prints every thread's Python stack: where it was, not only that it died.
TRAINER_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}


def run_training(ranks: int, output: Path, data: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    """``python -m training.train`` for one rank, ``torchrun --standalone`` for more."""
    launcher = [sys.executable, "-m", "training.train"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        launcher += ["-m", "training.train"]
    command = [
        *launcher,
        "--preset", "small",
        "--train", str(data["train"]),
        "--validation", str(data["validation"]),
        "--output", str(output),
        "--batch-size", str(GLOBAL_BATCH // ranks),
        "--no-progress",
        *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=TRAINER_ENV)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("planted")
    planted = PlantedClickModel(seed=0)
    paths = {"train": directory / "train.tsv", "validation": directory / "validation.tsv"}
    write_tsv(paths["train"], GLOBAL_BATCH * STEPS, planted, seed=1)
    write_tsv(paths["validation"], 3_001, planted, seed=2)  # odd: the ranks' last batches differ in size
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path]) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("runs")
    outputs = {1: root / "one-rank", 2: root / "two-ranks"}
    for ranks, output in outputs.items():
        result = run_training(ranks, output, data, "--checkpoint-every", str(CHECKPOINT_EVERY))
        assert result.returncode == 0, result.stderr[-4000:]
    return outputs


def metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())


def checkpoint_weights(checkpoint: Path, config: DLRMConfig) -> dict[str, torch.Tensor]:
    weights = match_checkpoint(checkpoint, config)
    return weights.read(list(weights.keys))


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=TOLERANCE, msg=key)


def test_ranks_split_every_global_batch(data: dict[str, Path], small_config: DLRMConfig) -> None:
    """Rank r parses the r-th quarter of every global batch: together the ranks read the file once, in order."""
    preprocessing = Preprocessing()
    whole = list(read_batches([data["validation"]], 1000, small_config, preprocessing))
    parts = [
        list(read_batches([data["validation"]], 250, small_config, preprocessing, rank=rank, world_size=4))
        for rank in range(4)
    ]
    assert [len(part) for part in parts] == [4, 3, 3, 3]  # 3,001 rows: the last global batch is 1 row, rank 0's
    for index, batch in enumerate(whole):
        pieces = [part[index] for part in parts if index < len(part)]
        torch.testing.assert_close(torch.cat([piece.dense_features for piece in pieces]), batch.dense_features)
        torch.testing.assert_close(torch.cat([piece.labels for piece in pieces]), batch.labels)
        ids = torch.cat([piece.sparse_features["cat_3"].values() for piece in pieces])
        torch.testing.assert_close(ids, batch.sparse_features["cat_3"].values())
    with pytest.raises(ValueError, match="rank 4 is not one of the 4 ranks"):
        next(read_batches([data["validation"]], 250, small_config, preprocessing, rank=4, world_size=4))


def test_two_ranks_train_the_one_rank_model(runs: dict[int, Path], small_config: DLRMConfig) -> None:
    """Same seed, same global batches: the sharded run ends with the one-process run's weights, loss and AUC."""
    one, two = metrics(runs[1]), metrics(runs[2])
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["rows_seen"] == two["rows_seen"] == GLOBAL_BATCH * STEPS
    assert one["validation_rows"] == two["validation_rows"] == 3_001
    assert abs(one["auc"] - two["auc"]) <= METRIC_TOLERANCE and abs(one["logloss"] - two["logloss"]) <= METRIC_TOLERANCE
    assert two["auc"] > 0.6
    one_weights = torch.load(runs[1] / WEIGHTS_FILE, weights_only=True)
    assert not (runs[2] / WEIGHTS_FILE).exists()  # no rank ever holds every table
    latest = latest_checkpoint(runs[2])
    assert latest is not None and latest.name == f"step-{STEPS:09d}"
    assert_same_weights(checkpoint_weights(latest, small_config), one_weights)


def test_two_nodes_meet_through_torchrun_s_rendezvous(
    runs: dict[int, Path], data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path
) -> None:
    """Two torchrun "nodes" of one rank each (c10d rendezvous on loopback, as on two machines) train the model
    one process trains."""
    output = tmp_path / "two-nodes"
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    rendezvous += ["--rdzv-endpoint", f"{LOOPBACK}:{free_port()}", "--rdzv-id", "dlrm-test"]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "training.train", "--preset", "small"]
    command += ["--train", str(data["train"]), "--validation", str(data["validation"]), "--output", str(output)]
    command += ["--batch-size", str(GLOBAL_BATCH // 2), "--no-progress"]
    nodes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TRAINER_ENV)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    # Both nodes' logs: a rank's failure is reported by its own node, its cause may be on the other.
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(
        f"--- node {index}, exit code {node.returncode}:\n{out[-6000:]}"
        for index, (node, out) in enumerate(zip(nodes, outputs, strict=True))
    )
    assert metrics(output)["ranks"] == 2
    latest = latest_checkpoint(output)
    assert latest is not None
    assert_same_weights(checkpoint_weights(latest, small_config), torch.load(runs[1] / WEIGHTS_FILE))


def test_training_joins_the_process_group_s_threads_before_exit(data: dict[str, Path], tmp_path: Path) -> None:
    """When ``training.train``'s main returns, gloo's threads are gone: none runs on into interpreter teardown,
    where a rank has been seen to abort ("terminate called without an active exception")."""
    script = (
        "import json, os, sys\n"
        "from training.train import main\n"
        "main(sys.argv[1:])\n"
        "tasks = os.listdir('/proc/self/task')\n"
        "print(json.dumps([open(f'/proc/self/task/{task}/comm').read().strip() for task in tasks]))\n"
    )
    command = [sys.executable, "-c", script, "--preset", "small", "--train", str(data["train"])]
    command += ["--validation", str(data["validation"]), "--output", str(tmp_path / "run"), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=TRAINER_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    threads = json.loads(result.stdout.splitlines()[-1])
    assert "python" in threads and not [name for name in threads if "gloo" in name], threads


def test_each_rank_holds_only_its_shards(runs: dict[int, Path], small_config: DLRMConfig) -> None:
    sharding = json.loads((runs[2] / "sharding.json").read_text())
    total = sum(small_config.num_embeddings_per_feature) * small_config.embedding_dim * 4
    assert sharding["world_size"] == 2
    held = sharding["rank_table_bytes"]
    assert sum(held) == total and all(0 < rank_bytes < total for rank_bytes in held), held
    placed = [0, 0]
    for name, table in sharding["tables"].items():
        rows = small_config.num_embeddings_per_feature[small_config.sparse_feature_names.index(name[2:])]
        for piece in table["shards"]:
            placed[piece["rank"]] += piece["sizes"][0] * piece["sizes"][1] * 4
        assert sum(piece["sizes"][0] for piece in table["shards"] if piece["offsets"][1] == 0) == rows, name
    assert placed == held


def test_checkpoint_resumes_on_another_number_of_ranks(
    runs: dict[int, Path], data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path
) -> None:
    """The two-rank run's mid-epoch checkpoint, resumed by one process, ends where the two-rank run ended."""
    middle = next(path for path in checkpoint_dirs(runs[2]) if path.name == f"step-{2 * CHECKPOINT_EVERY:09d}")
    resumed = tmp_path / "resumed"
    shutil.copytree(middle, resumed / "checkpoints" / middle.name)
    wrong = run_training(1, resumed, data, "--resume", "--batch-size", "100")
    assert wrong.returncode != 0 and "was written with 512 rows per step" in wrong.stderr
    result = run_training(1, resumed, data, "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert metrics(resumed)["rows_seen"] == GLOBAL_BATCH * (STEPS - 2 * CHECKPOINT_EVERY)
    assert_same_weights(torch.load(resumed / WEIGHTS_FILE, weights_only=True), torch.load(runs[1] / WEIGHTS_FILE))
    fresh = run_training(1, tmp_path / "fresh", data, "--resume")  # nothing to resume: a run from the start
    assert fresh.returncode == 0 and metrics(tmp_path / "fresh")["rows_seen"] == GLOBAL_BATCH * STEPS


def test_converted_checkpoint_serves_the_trained_scores(
    runs: dict[int, Path], data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path
) -> None:
    """The two-rank run archived from its DCP checkpoint: fp32 and int8, served by TorchServe."""
    store = tmp_path / "store"
    for name, args in {"dlrm": (), "int8": ("--quantize", "int8")}.items():
        result = build_archive(store / f"{name}.mar", "--checkpoint", str(runs[2]), *args)
        assert result.returncode == 0, result.stderr
    # Streamed table by table from a checkpoint, int8 tables are byte for byte those quantized in memory from the
    # same weights (the one-rank run's weights.pt and its last checkpoint).
    one_rank_checkpoint = latest_checkpoint(runs[1])
    assert one_rank_checkpoint is not None
    for name, source in {"streamed": ("--preset", "small", "--checkpoint", str(one_rank_checkpoint)),
                         "in_memory": ("--checkpoint", str(runs[1]))}.items():  # fmt: skip
        result = build_archive(tmp_path / name / "int8.mar", *source, "--quantize", "int8")
        assert result.returncode == 0, result.stderr
    with (
        extracted(tmp_path / "streamed" / "int8.mar") as streamed,
        extracted(tmp_path / "in_memory" / "int8.mar") as in_memory,
    ):
        assert (streamed / "tables.bin").read_bytes() == (in_memory / "tables.bin").read_bytes()
    with extracted(store / "int8.mar") as directory:
        int8_model, _ = load_model(directory, copy_tables=True)

    latest = latest_checkpoint(runs[2])
    assert latest is not None
    trained = load_weights(build_dlrm(small_config), checkpoint_weights(latest, small_config)).eval()
    rows = [raw_request_row(line) for line in data["validation"].read_text().splitlines()[:32]]
    batch = next(read_batches([data["validation"]], 32, small_config, Preprocessing()))
    with torch.no_grad():
        expected = trained(batch.dense_features, batch.sparse_features).squeeze(1).numpy()
        expected_int8 = int8_model(batch.dense_features, batch.sparse_features).squeeze(1).numpy()
    with TorchServeProcess(store, "dlrm=dlrm.mar,int8=int8.mar", tmp_path / "torchserve") as server:
        for name, scores in {"dlrm": expected, "int8": expected_int8}.items():
            server.wait_ready(name)
            response = requests.post(
                f"{server.endpoints.inference}/predictions/{name}", json={"instances": rows}, timeout=60
            )
            assert response.status_code == 200, response.text
            served = [prediction["logit"] for prediction in response.json()["predictions"]]
            np.testing.assert_allclose(served, scores, rtol=0, atol=TOLERANCE, err_msg=name)


def test_a_checkpoint_of_torchrec_s_own_training_wrapper_is_archived(small_config: DLRMConfig, tmp_path: Path) -> None:
    """TorchRec's DLRM examples train ``DLRMTrain(DLRM)`` and checkpoint its keys under ``model.``: found by their
    ending, archived exactly."""
    model = init_weights(build_dlrm(small_config), seed=5)
    checkpoint = tmp_path / "dlrm-train-step-10"
    dcp.save(DLRMTrain(model).state_dict(), checkpoint_id=checkpoint, no_dist=True)
    assert all(key.startswith("model.") for key in match_checkpoint(checkpoint, small_config).keys.values())
    result = build_archive(tmp_path / "dlrm.mar", "--preset", "small", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    with extracted(tmp_path / "dlrm.mar") as directory:
        artifact = read_artifact(directory)
        archived = served_weights(directory)
    assert artifact.provenance.trained and artifact.provenance.checkpoint == checkpoint.name
    assert_same_weights(archived, model.state_dict())


def test_a_checkpoint_of_another_model_is_refused(runs: dict[int, Path], tmp_path: Path) -> None:
    latest = latest_checkpoint(runs[2])
    assert latest is not None
    result = build_archive(tmp_path / "dlrm.mar", "--preset", "criteo-kaggle", "--checkpoint", str(latest))
    assert result.returncode != 0
    assert f"{latest} does not hold this model config's weights" in result.stderr
    wider = preset("small").to_dict() | {"num_embeddings_per_feature": [20_000] * 26}
    config = tmp_path / "wider.json"
    config.write_text(json.dumps(wider))
    result = build_archive(tmp_path / "dlrm.mar", "--config", str(config), "--checkpoint", str(latest))
    assert result.returncode != 0
    assert "does not match the model config" in result.stderr
    assert "t_cat_0.weight is (10000, 16) in the checkpoint, (20000, 16) in the config" in result.stderr
    not_a_checkpoint = build_archive(tmp_path / "dlrm.mar", "--checkpoint", str(tmp_path))
    assert not_a_checkpoint.returncode != 0 and "neither a trainer output" in not_a_checkpoint.stderr


def test_the_kubernetes_training_job_runs_the_documented_command() -> None:
    """The PyTorchJob's pods run torchrun over the trainer's own command line, sharing one volume for the runs."""
    manifests = Path(__file__).parents[1] / "deploy" / "k8s"
    claim, job = yaml.safe_load_all((manifests / "training" / "pytorchjob.yaml").read_text())
    assert (claim["kind"], job["kind"]) == ("PersistentVolumeClaim", "PyTorchJob")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every rank writes its shards of each checkpoint
    serving = next(yaml.safe_load_all((manifests / "deployment.yaml").read_text()))
    serving_image = serving["spec"]["template"]["spec"]["containers"][0]["image"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    for role in replicas.values():
        pod = role["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == serving_image
        command = container["command"]
        assert command[:3] == ["torchrun", "-m", "training.train"]
        config = parse_args(command[3:])
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        shared = next(name for name, volume in volumes.items() if "persistentVolumeClaim" in volume)
        assert volumes[shared]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert config.output.is_relative_to(mounts[shared]) and config.resume
        assert all(path.is_relative_to(mounts[shared]) for path in config.train_paths + config.validation_paths)
        threads = int(next(env["value"] for env in container["env"] if env["name"] == "OMP_NUM_THREADS"))
        assert int(job["spec"]["nprocPerNode"]) * threads == int(container["resources"]["limits"]["cpu"])
