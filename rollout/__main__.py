"""Model updates without downtime on a running TorchServe (docs/deploy.md, "Model updates without downtime").

    python -m rollout publish dlrm-2.0            # a new version, gated on its golden set
    python -m rollout rollback [--to 1.0]         # back to an earlier version in the model store
    python -m rollout status                      # the registered versions
    python -m rollout check --archive model_store/dlrm.mar   # served as built? (exit 1 if not)

The server must run with the model-management API on and token authorization on
(TS_ENABLE_MODEL_API=true TS_DISABLE_TOKEN_AUTHORIZATION=false); the keys are read
from TorchServe's key_file.json (in the directory it was started from), and read
again, or renewed, when TorchServe refuses an expired one (docs/operations.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rollout.gate import DEFAULT_LIMITS, GateLimits
from rollout.publish import Switch, check, publish, rollback
from rollout.server import RolloutError, TorchServe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="dlrm", help="the model name (default: %(default)s)")
    common.add_argument("--model-store", type=Path, default=Path("model_store"), help="default: %(default)s")
    common.add_argument("--management", default="http://127.0.0.1:8081", help="management API (default: %(default)s)")
    common.add_argument("--inference", default="http://127.0.0.1:8080", help="inference API (default: %(default)s)")
    common.add_argument(
        "--key-file",
        type=Path,
        default=Path("key_file.json"),
        help="TorchServe's key file; absent: no token (default: %(default)s)",
    )
    common.add_argument(
        "--register-timeout",
        type=float,
        default=600.0,
        help="seconds a new version may take to register, its workers included; a publish that takes longer "
        "fails and unregisters it (default: %(default)s)",
    )
    common.add_argument(
        "--drain-grace",
        type=float,
        default=2.0,
        help="seconds the old version keeps its workers after its queue is empty (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument(
        "--max-served-drift",
        type=float,
        default=DEFAULT_LIMITS.max_served_drift,
        help="largest |served - built| golden score (default: %(default)s)",
    )
    limits.add_argument("--min-auc", type=float, help="an AUC floor on the golden set (default: none)")
    publish_parser = commands.add_parser("publish", parents=[common, limits], help="publish a new version")
    publish_parser.add_argument("archive", help="the new version's archive: a name in the model store")
    publish_parser.add_argument(
        "--max-auc-drop",
        type=float,
        default=DEFAULT_LIMITS.max_auc_drop,
        help="largest AUC drop from the current version (default: %(default)s)",
    )
    publish_parser.add_argument(
        "--max-mean-drift",
        type=float,
        default=DEFAULT_LIMITS.max_mean_drift,
        help="largest mean |score change| from the current version (default: %(default)s)",
    )
    check_parser = commands.add_parser(
        "check", parents=[common, limits], help="score the archive's golden set on the server (a startup probe)"
    )
    check_parser.add_argument("--archive", type=Path, required=True, help="the archive the server serves")
    rollback_parser = commands.add_parser("rollback", parents=[common], help="go back to an earlier version")
    rollback_parser.add_argument("--to", help="the version (default: the newest below the current one)")
    commands.add_parser("status", parents=[common], help="list the registered versions")
    return parser.parse_args(argv)


def describe(switch: Switch) -> str:
    retired = f", {switch.old} retired" if switch.old else ""
    return f"{switch.model}: {switch.new} is the default version{retired} (gate {switch.verdict})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    key_file = args.key_file if args.key_file.is_file() else None
    try:
        server = TorchServe(args.management, args.inference, key_file=key_file, register_timeout=args.register_timeout)
    except RolloutError as error:
        sys.exit(f"rollout: {error}")
    try:
        if args.command == "publish":
            limits = GateLimits(args.max_auc_drop, args.max_mean_drift, args.max_served_drift, args.min_auc)
            print(describe(publish(server, args.model_store, args.archive, args.model, limits, args.drain_grace)))
        elif args.command == "check":
            limits = GateLimits(max_served_drift=args.max_served_drift, min_auc=args.min_auc)
            verdict = check(server, args.archive, args.model, limits)
            print(f"{args.model} {args.archive}: {verdict}")
            if not verdict.passed:
                sys.exit(1)
        elif args.command == "rollback":
            print(describe(rollback(server, args.model_store, args.model, args.to, args.drain_grace)))
        else:
            for state in server.versions(args.model):
                marker = " (default)" if state.default else ""
                print(f"{args.model} {state.version}{marker}: {state.ready_workers} ready workers")
    except RolloutError as error:
        # The notes say what a failed publish could not undo.
        sys.exit("\n".join([f"rollout: {error}", *getattr(error, "__notes__", [])]))
    finally:
        server.close()


if __name__ == "__main__":
    main()
