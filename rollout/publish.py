"""Publish a new model version to a running TorchServe, or roll back to an earlier one, without downtime.

A version is an archive of its own in the model store (a ``.mar`` or an unzipped
directory: never an archive modified in place). Publishing:

1. registers it beside the current version and waits for its workers;
2. gates it (rollout/gate.py) on its golden set, scored through the server;
   refused, it is unregistered and the current version keeps all traffic;
3. makes it the default: TorchServe routes ``/predictions/{model}`` and
   ``/v2/models/{model}/infer`` requests to it from the next request on;
4. drains the old version (no queued request, then a grace period for the
   batch in its workers) and unregisters it, which stops its workers and
   frees their memory. Its archive stays in the store, for a rollback.

A publish that fails before step 3 (a refused gate, an error, a registration
past its timeout that TorchServe completes anyway) unregisters the new version:
the server is left as it was, and the error raised is the one that failed it
(a failed cleanup is added to it as a note).

Both versions run side by side during the switch: the host needs the memory of
both for that time (mapped tables: the page cache of both table files).
"""

from __future__ import annotations

import json
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from model_archive.contents import MANIFEST, read_file, serving_settings
from model_archive.golden import GOLDEN_FILE, GoldenSet
from rollout.gate import DEFAULT_LIMITS, GateLimits, Verdict, evaluate
from rollout.server import NoAnswer, RolloutError, TorchServe

# How long a failed publish waits for a version whose registration got no answer to show up (and be unregistered).
UNANSWERED_WAIT_S = 60.0


class GateRefused(RolloutError):
    """The new version failed the quality gate; it was unregistered and traffic did not move."""


@dataclass(frozen=True)
class Switch:
    model: str
    old: str | None
    new: str
    verdict: Verdict


def archive_version(archive: Path) -> str:
    return str(json.loads(read_file(archive, MANIFEST))["model"]["modelVersion"])


def golden_set(archive: Path) -> GoldenSet:
    try:
        return GoldenSet.from_json(read_file(archive, GOLDEN_FILE))
    except (FileNotFoundError, KeyError) as error:
        raise RolloutError(
            f"{archive} carries no golden set: build it with build_mar.py --golden-set <held-out TSV>"
        ) from error


def publish(
    server: TorchServe,
    model_store: Path,
    archive: str,
    model: str = "dlrm",
    limits: GateLimits | None = DEFAULT_LIMITS,
    drain_grace_s: float = 2.0,
) -> Switch:
    """Move ``model``'s traffic to ``archive`` (a name in ``model_store``); ``limits=None`` gates on integrity only."""
    path = model_store / archive
    try:
        new = archive_version(path)
    except (OSError, KeyError, ValueError) as error:
        raise RolloutError(f"{path} is not a readable model archive: {error}") from error
    golden = golden_set(path)
    rows_per_request = serving_settings(path).max_rows
    registered = server.versions(model)
    old = next((state.version for state in registered if state.default), None)
    if new == old:
        raise RolloutError(f"{model} {new} is already the default version")
    if any(state.version == new for state in registered):
        raise RolloutError(f"{model} {new} is already registered: unregister it first, or publish another version")
    try:
        server.register(archive, model)
        new_scores = server.score(model, new, golden.rows, rows_per_request)
        current_scores = None
        if old is not None and limits is not None:
            current_scores = server.score(model, old, golden.rows, rows_per_request)
        verdict = evaluate(golden, new_scores, current_scores, limits or DEFAULT_LIMITS)
        if not verdict.passed:
            raise GateRefused(f"{model} {new} {verdict}")
        server.set_default(model, new)
    except BaseException as error:
        withdraw(server, model, new, error)
        raise
    if old is not None:
        server.drain(model, old, drain_grace_s)
        server.unregister(model, old)
    return Switch(model, old, new, verdict)


def withdraw(server: TorchServe, model: str, version: str, error: BaseException) -> None:
    """Unregister ``version`` after ``error`` failed its publish, so that the server is left as it was.

    A call that got no answer (``NoAnswer``: a registration past its timeout, say) may still be carried
    out, so then the version is awaited a while. ``error`` stays the error raised: a failed cleanup is
    added to it as a note.
    """
    wait_s = UNANSWERED_WAIT_S if isinstance(error, NoAnswer) else 0.0
    deadline = time.monotonic() + wait_s
    try:
        while not any(state.version == version for state in server.versions(model)):
            if time.monotonic() >= deadline:
                if wait_s:
                    error.add_note(
                        f"{model} {version} was not registered {wait_s:.0f} s later; should `python -m rollout status` "
                        f"list it, unregister it (DELETE /models/{model}/{version})"
                    )
                return
            time.sleep(0.2)
        server.unregister(model, version)
    except RolloutError as cleanup:
        error.add_note(
            f"and {model} {version} may still be registered: removing it failed: {cleanup}; "
            f"unregister it (DELETE /models/{model}/{version}) once the server answers"
        )


def check(server: TorchServe, archive: Path, model: str = "dlrm", limits: GateLimits = DEFAULT_LIMITS) -> Verdict:
    """Whether the server serves ``archive``'s version as built: its golden set, scored now (integrity, AUC floor)."""
    golden = golden_set(archive)
    scores = server.score(model, archive_version(archive), golden.rows, serving_settings(archive).max_rows)
    return evaluate(golden, scores, None, limits)


def store_versions(model_store: Path) -> dict[str, str]:
    """The archives in the model store by version (entries that are not readable archives are skipped)."""
    versions: dict[str, str] = {}
    for entry in sorted(model_store.iterdir()):
        if entry.suffix == ".mar" or (entry / MANIFEST).is_file():
            try:
                versions.setdefault(archive_version(entry), entry.name)
            except (OSError, KeyError, ValueError):
                continue
    return versions


def previous_archive(model_store: Path, current: str) -> str:
    """The archive in the store with the highest version below ``current``."""
    below = []
    for version, archive in store_versions(model_store).items():
        with suppress(InvalidVersion):
            if Version(version) < Version(current):
                below.append((Version(version), archive))
    if not below:
        raise RolloutError(f"no archive in {model_store} has a version below {current}")
    return max(below)[1]


def rollback(
    server: TorchServe, model_store: Path, model: str = "dlrm", to: str | None = None, drain_grace_s: float = 2.0
) -> Switch:
    """Publish an earlier version again (``to``, else the newest below the current one), gated on integrity only."""
    current = server.default_version(model)
    if current is None:
        raise RolloutError(f"{model} is not registered: nothing to roll back")
    archive = previous_archive(model_store, current) if to is None else store_versions(model_store).get(to)
    if archive is None:
        raise RolloutError(f"no archive of version {to} in {model_store}")
    return publish(server, model_store, archive, model, limits=None, drain_grace_s=drain_grace_s)
