"""The image's build context: every file the Dockerfile reads is in it.

Fast checks of what `make test-container` (minutes, Podman) and a cluster (none here) would find late:
every file the Dockerfile reads is in the build context, the manifests are valid Kubernetes objects.
"""

from __future__ import annotations

import subprocess

import pytest

from deploy.container.test_container import ARCHIVE as CONTAINER_TEST_ARCHIVE
from servers.torchserve import REPO_ROOT
from tests.build_context import admitted_files, context_sources, excluded, parse_dockerignore

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
