"""The image's build context, its JVM settings, the container entry point and the Kubernetes manifests.

Fast checks of what `make test-container` (minutes, Podman) and a cluster (none here) would find late:
every file the Dockerfile reads is in the build context, the manifests are valid Kubernetes objects.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy.container import entrypoint
from deploy.container.test_container import ARCHIVE as CONTAINER_TEST_ARCHIVE
from servers.torchserve import REPO_ROOT
from tests.build_context import admitted_files, context_sources, excluded, instructions, parse_dockerignore

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
RULES = parse_dockerignore((REPO_ROOT / ".dockerignore").read_text())
K8S = REPO_ROOT / "deploy" / "k8s"

# ---------------------------------------------------------------- build context


@pytest.mark.parametrize(
    ("patterns", "path", "left_out"),
    [
        (["*"], "handler/rows.py", True),  # a matching directory takes everything below it
        (["*", "!handler"], "handler/rows.py", False),
        (["*", "!handler"], "deploy/handler/rows.py", True),  # anchored at the root, unlike gitignore
        (["*", "!handler", "**/__pycache__"], "handler/a/b/__pycache__/x.pyc", True),  # ** spans directories
        (["**/__pycache__"], "__pycache__/x.pyc", True),  # **/ may match no directory at all
        (["*", "!**/*.mar"], ".cache/containers/dlrm.mar", False),  # re-admitted below an excluded directory
        (["*/temp*"], "somedir/temporary.txt", True),  # Docker's documented examples
        (["*/temp*"], "somedir/sub/temporary.txt", False),
        (["*/*/temp*"], "somedir/subdir/temporary.txt", True),
        (["temp?"], "tempa", True),
        (["temp?"], "tempab", False),
        (["/docs/", "!docs/keep.md"], "docs/keep.md", False),  # leading and trailing slashes are cleaned
    ],
)
def test_dockerignore_rules_match_as_docker_matches(patterns: list[str], path: str, left_out: bool) -> None:
    assert excluded(path, parse_dockerignore("\n".join(patterns))) is left_out


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return listing.stdout.splitlines()


def test_every_path_the_dockerfile_reads_is_in_the_build_context() -> None:
    """A COPY of a path that .dockerignore leaves out fails the build, late (after the minutes of pip)."""
    tracked = tracked_files()
    sources = set(context_sources(DOCKERFILE))
    assert {"handler", "training", "model_store/dlrm.mar"} <= sources, "the parser found the COPY and RUN sources"
    archives = {"model_store/dlrm.mar", str(CONTAINER_TEST_ARCHIVE.relative_to(REPO_ROOT))}
    for source in sorted(sources - archives):
        admitted, left_out = admitted_files(source, REPO_ROOT, tracked, RULES)
        assert admitted, f"COPY {source}: nothing of it is in the build context"
        assert not left_out, f"COPY {source}: .dockerignore leaves out {left_out[:5]}"
    for archive in archives:  # the RUN --mount=type=bind archive: the default, and make test-container's
        assert not excluded(archive, RULES), f"MODEL_ARCHIVE={archive} is not in the build context"


def test_build_context_leaves_out_the_rest_of_the_checkout() -> None:
    checkout = [".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "data/synthetic/train.tsv", "runs/x/w.pt"]
    built = ["logs/ts_log.log", "frontend_agent/build/dlrm-frontend-agent.jar", "x/__pycache__/y.pyc"]
    for path in checkout + built:
        assert excluded(path, RULES), path


# ---------------------------------------------------------------- the image's JVM


def image_vmargs(tmp_path: Path) -> list[str]:
    """The JVM options of the image's config.properties: the Dockerfile's own step run on the checkout's file."""
    (step,) = [run.body for run in instructions(DOCKERFILE) if run.keyword == "RUN" and "vmargs=" in run.body]
    config = tmp_path / "config.properties"
    shutil.copy(REPO_ROOT / "config.properties", config)
    # The step ends with the build's own check of the result.
    subprocess.run(["sh", "-c", step.replace(" /opt/dlrm/config.properties", f" {config}")], check=True)
    (line,) = [line for line in config.read_text().splitlines() if line.startswith("vmargs=")]
    return line.removeprefix("vmargs=").split()


def test_image_bounds_the_jvm_heap_by_the_container_memory(tmp_path: Path) -> None:
    vmargs = image_vmargs(tmp_path)
    assert "-XX:+ExitOnOutOfMemoryError" in vmargs
    fixed_heap = [flag for flag in vmargs if flag.startswith(("-Xmx", "-XX:MaxHeapSize"))]
    assert not fixed_heap, "a fixed heap size would ignore the container's limit"
    (percentage,) = [float(flag.split("=")[1]) for flag in vmargs if flag.startswith("-XX:MaxRAMPercentage=")]
    deployment = k8s_documents(K8S)["Deployment"]
    memory = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    heap_mib = int(memory.removesuffix("Gi")) * 1024 * percentage / 100
    # The frontend's measured live heap is 45-60 MiB, 182 MiB under 16 concurrent 2,000-row requests;
    # what the heap does not take is the Python workers' (JVM default: a quarter of the limit).
    assert 192 <= heap_mib <= 512 and percentage < 25, f"{heap_mib:.0f} MiB heap of {memory}"


# ---------------------------------------------------------------- the container entry point


def model_config(archive: Path) -> dict[str, Any]:
    with zipfile.ZipFile(archive) as opened:
        return yaml.safe_load(opened.read("model-config.yaml"))


def test_entry_point_settings_replace_the_one_copy_of_the_archive(model_store: Path, tmp_path: Path) -> None:
    archive = model_store / "dlrm.mar"
    settings_store = tmp_path / "dlrm-model-store"
    assert entrypoint.model_store({}, archive, settings_store) == model_store, "no DLRM_* setting: the image's own"
    assert not settings_store.exists()
    for workers in (1, 2, 3):  # three starts of a container
        served = entrypoint.model_store({"DLRM_WORKERS": str(workers)}, archive, settings_store)
        assert served == settings_store
        assert [path.name for path in settings_store.iterdir()] == ["dlrm.mar"], "one copy, however many starts"
        assert model_config(served / "dlrm.mar")["minWorkers"] == workers
    assert [path.name for path in tmp_path.iterdir()] == ["dlrm-model-store"]
    with zipfile.ZipFile(archive) as original, zipfile.ZipFile(settings_store / "dlrm.mar") as rewritten:
        assert original.namelist() == rewritten.namelist()
        for name in original.namelist():
            if name != "model-config.yaml":
                assert original.read(name) == rewritten.read(name), name
    settings = ("minWorkers", "maxWorkers")
    config, rewritten_config = model_config(archive), model_config(settings_store / "dlrm.mar")
    assert {k: v for k, v in config.items() if k not in settings} == {
        k: v for k, v in rewritten_config.items() if k not in settings
    }


# ---------------------------------------------------------------- Kubernetes manifests

# The Kubernetes versions checked: the oldest and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ["1.25", kubernetes_validate.latest_version()]

# Kubeflow training operator's kubeflow.org/v1 PyTorchJob, down to the pod templates (checked against
# Kubernetes' PodTemplateSpec): its CRD is not published in a package, so its fields are written out here.
REPLICA_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": {"type": "object"},
    },
}
PYTORCH_JOB = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "nprocPerNode": {"type": "string"},
                "elasticPolicy": {"type": "object"},
                "runPolicy": {"type": "object"},
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["Master"],
                    "properties": {"Master": REPLICA_SPEC, "Worker": REPLICA_SPEC},
                },
            },
        },
    },
}


def validate(document: dict[str, Any], version: str) -> None:
    """Raises jsonschema.ValidationError where ``document`` is not a valid object of Kubernetes ``version``.

    Strict: a field the API does not know (a typo) is an error, as `kubectl apply` reports it.
    """
    if document["kind"] != "PyTorchJob":
        kubernetes_validate.validate(document, version, strict=True)
        return
    jsonschema.validate(document, PYTORCH_JOB)
    for role, replica in document["spec"]["pytorchReplicaSpecs"].items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}}
        kubernetes_validate.validate({**pod_template, "template": replica["template"]}, version, strict=True)


def k8s_documents(directory: Path) -> dict[str, dict[str, Any]]:
    """Every object of the manifests under ``directory``, by kind."""
    return {
        document["kind"]: document
        for path in sorted(directory.rglob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_are_valid_api_objects(version: str) -> None:
    documents = k8s_documents(K8S)
    serving = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert set(documents) == serving | {"PersistentVolumeClaim", "PyTorchJob"}
    for document in documents.values():
        validate(document, version)


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    if document["kind"] == "PyTorchJob":
        return document["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return document["spec"]["template"]["spec"]


def misspell(document: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of ``document`` with one field misspelt (or of the wrong type) at ``where``."""
    document = copy.deepcopy(document)
    if where == "container":
        container = pod_spec(document)["containers"][0]
        container["livenesProbe"] = container.pop("livenessProbe", {})
    elif where == "pod":
        pod_spec(document)["securityContex"] = pod_spec(document).pop("securityContext")
    elif where == "replica":
        replica = document["spec"]["pytorchReplicaSpecs"]["Master"]
        replica["restartpolicy"] = replica.pop("restartPolicy")
    elif where == "type":
        document["spec"]["replicas"] = "two"
    return document


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("Deployment", "container"),
        ("Deployment", "pod"),
        ("Deployment", "type"),
        ("PyTorchJob", "container"),
        ("PyTorchJob", "pod"),
        ("PyTorchJob", "replica"),
    ],
)
def test_schema_check_refuses_a_misspelt_field(kind: str, where: str) -> None:
    document = k8s_documents(K8S)[kind]
    validate(document, KUBERNETES_VERSIONS[-1])
    with pytest.raises(jsonschema.ValidationError):
        validate(misspell(document, where), KUBERNETES_VERSIONS[-1])
