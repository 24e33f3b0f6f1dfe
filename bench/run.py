"""Benchmark the DLRM serving path in one run on one machine, and write JSON, Markdown and a plot.

For each TorchServe setting measured, the run

1. builds the DLRM archive with ``build_mar.py`` (checkpoint or preset, and archive options as
   given) and a no-op archive with the same ``model-config.yaml`` (``bench/noop_handler.py``);
   once per run, it measures this machine's GEMM limit for the model's MLPs
   (:mod:`bench.machine_limit`), against which the report states every rows/s figure;
2. times the serving path in-process (:mod:`bench.inprocess`, ``DLRMPredictor`` from the archive);
3. serves each archive with ``servers.torchserve.TorchServeProcess`` (the shipped ``config.properties``
   on free ports) and drives it with wrk (:mod:`bench.load`): single-row requests at several
   concurrencies and ``instances`` bodies of several sizes;
4. optionally profiles the DLRM worker under load with py-spy (:mod:`bench.profile`).

Results go to ``bench/results/<time>-<kind>-<mode>/``: ``results.json``, ``results.md``,
``results.png`` and, with ``--profile``, flame graphs.

    python -m bench.run --checkpoint runs/criteo-kaggle-synthetic  # as `make bench` runs it
    python -m bench.run                              # criteo-kaggle, random weights, shipped settings
    python -m bench.run --mode quick                 # seconds per point, fewer points (or BENCH_MODE=quick)
    python -m bench.run --archive-args="--seed 1"    # more build_mar.py options
    python -m bench.run --workers 2 --batch-size 1   # other TorchServe settings
    python -m bench.run --log-config builtin         # TorchServe's own frontend logging (DEBUG)
    python -m bench.run --omp-wait-policy active     # OpenMP threads spin instead of sleeping
    python -m bench.run --sweep                      # the settings in SWEEP, fewer points each
    python -m bench.run --sweep --setting workers=2,threads=1,batch=32,delay=5,omp=passive --setting ...
    python -m bench.run --profile                    # also py-spy the worker under load
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine_limit, profile, report
from bench.harness import build_archive, machine_record, results_dir, run_command, write_results
from bench.load import Point, PointResult, measure_point
from bench.workload import DISTINCT_ROWS, Body, Protocol, criteo_like_inputs, request_bodies
from handler.settings import ServingSettings
from model_archive.contents import MODEL_YAML, model_artifact, read_file, serving_settings
from servers.torchserve import TorchServeProcess, executable

NOOP_HANDLER = Path(__file__).with_name("noop_handler.py")
SHIPPED = "shipped"  # frontend logging as config.properties sets it (log4j2.xml; no vmargs override)
BUILTIN = "builtin"  # TorchServe's built-in log4j2 configuration (vmargs emptied)
DEFAULT_PRESET = "criteo-kaggle"
# Concurrency of the `instances` points: a few requests in flight keep the worker busy.
INSTANCE_CONCURRENCY = 4


@dataclass(frozen=True)
class Mode:
    load_seconds: int
    warmup_seconds: int
    inprocess_seconds: float
    profile_seconds: int
    concurrencies: tuple[int, ...]
    instance_rows: tuple[int, ...]
    oip_rows: tuple[int, ...]  # rows per Open Inference Protocol request (JSON and binary tensors)
    inprocess_batches: tuple[int, ...]


MODES = {
    "quick": Mode(
        load_seconds=3,
        warmup_seconds=1,
        inprocess_seconds=0.5,
        profile_seconds=5,
        concurrencies=(1, 32),
        instance_rows=(256,),
        oip_rows=(1024,),
        inprocess_batches=(1, 256),
    ),
    "full": Mode(
        load_seconds=15,
        warmup_seconds=3,
        inprocess_seconds=3.0,
        profile_seconds=20,
        concurrencies=(1, 8, 32),
        instance_rows=(64, 256, 1024),
        oip_rows=(256, 1024),
        inprocess_batches=(1, 32, 256, 1024, 4096),
    ),
}


OMP_WAIT_POLICIES = ("ACTIVE", "PASSIVE")
# Keys of --setting and the Setting fields they set (besides log and omp).
SETTING_KEYS = {"workers": "workers", "threads": "threads", "batch": "batch_size", "delay": "max_batch_delay"}


# build_mar.py's defaults: the shipped settings.
_SHIPPED = ServingSettings()


@dataclass(frozen=True)
class Setting:
    """One measured configuration: model-config.yaml values, the frontend's log config, the workers' OpenMP wait.

    The defaults are what ships: build_mar.py's defaults, config.properties' log4j2.xml, and
    OMP_WAIT_POLICY=PASSIVE (which ``TorchServeProcess`` sets, like ``make serve`` and the image).
    """

    workers: int = _SHIPPED.workers
    threads: int = _SHIPPED.threads  # torch threads per worker; 0 = usable cores / workers
    batch_size: int = _SHIPPED.batch_size
    max_batch_delay: int = _SHIPPED.max_batch_delay_ms
    log_config: str = SHIPPED  # BUILTIN, or a log4j2.xml path, passed to the frontend through vmargs
    omp_wait_policy: str = ""  # OMP_WAIT_POLICY of the workers (and the in-process run); "" = shipped (PASSIVE)

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``workers=2,threads=1,batch=32,delay=5,log=builtin,omp=active``; keys left out keep their default."""
        values: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key == "log":
                values["log_config"] = check_log_config(value)
            elif key == "omp" and value.upper() in OMP_WAIT_POLICIES:
                values["omp_wait_policy"] = value.upper()
            elif key in SETTING_KEYS and value.isdigit():
                values[SETTING_KEYS[key]] = int(value)
            else:
                raise argparse.ArgumentTypeError(
                    f"bad setting {item!r} in {text!r}: use {', '.join(SETTING_KEYS)}, log, omp"
                )
        return cls(**values)

    def build_args(self) -> list[str]:
        return [
            "--workers", str(self.workers), "--threads", str(self.threads),
            "--batch-size", str(self.batch_size), "--max-batch-delay", str(self.max_batch_delay),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"OMP_WAIT_POLICY": self.omp_wait_policy or "PASSIVE"}

    def overrides(self) -> dict[str, str]:
        if self.log_config == SHIPPED:
            return {}
        if self.log_config == BUILTIN:
            return {"vmargs": ""}
        return {"vmargs": f"-Dlog4j.configurationFile=file://{Path(self.log_config).resolve()}"}

    @property
    def label(self) -> str:
        threads = self.threads or "auto"
        log = "" if self.log_config == SHIPPED else f", log {Path(self.log_config).name}"
        omp = f", OMP {self.omp_wait_policy.lower()}" if self.omp_wait_policy else ""
        batching = f"batch {self.batch_size}/{self.max_batch_delay} ms"
        return f"{self.workers} worker(s) x {threads} thread(s), {batching}{log}{omp}"


def check_log_config(value: str) -> str:
    if value not in (SHIPPED, BUILTIN) and not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"log config {value!r} is not a file (or say {SHIPPED!r} or {BUILTIN!r})")
    return value


# The sweep: the reference's defaults (2 workers x 2 threads, no batching, TorchServe's own logging, spinning
# OpenMP threads), the shipped settings, then the shipped settings with one change each.
SWEEP = tuple(
    Setting.parse(text)
    for text in (
        "workers=2,threads=2,batch=1,delay=0,log=builtin,omp=active",
        "",
        "log=builtin",
        "omp=active",
        "workers=1",
        "workers=1,threads=1",
        "delay=5",
        "batch=1,delay=0",
    )
)


@dataclass
class SettingResult:
    setting: Setting
    label: str
    model_yaml: dict[str, Any]
    threads_per_worker: int
    inprocess: list[dict[str, Any]] = field(default_factory=list)
    # The model forward with the threads of all workers together: the ceiling for large OIP requests.
    inprocess_all_threads: list[dict[str, Any]] = field(default_factory=list)
    served: list[PointResult] = field(default_factory=list)
    noop: list[PointResult] = field(default_factory=list)
    profiles: dict[str, dict[str, float]] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mode",
        choices=sorted(MODES),
        default=os.environ.get("BENCH_MODE", "full"),
        help="quick: seconds per point and fewer points (smoke test); full: figures to publish "
        "(default: $BENCH_MODE or full)",
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"build_mar.py --preset, random weights (default: {DEFAULT_PRESET}); '' leaves the model to "
        "--archive-args (--config)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="trained weights, build_mar.py --checkpoint: a trainer output directory, whose shape replaces --preset",
    )
    parser.add_argument(
        "--archive-args",
        default="",
        help="more build_mar.py options, one shell-quoted string (e.g. '--quantize int8'); "
        "TorchServe settings have their own flags below",
    )
    settings = parser.add_argument_group("TorchServe settings of a single run (defaults: build_mar.py's)")
    defaults = Setting()
    settings.add_argument("--workers", type=int, default=defaults.workers)
    settings.add_argument("--threads", type=int, default=defaults.threads, help="per worker; 0 = cores / workers")
    settings.add_argument("--batch-size", type=int, default=defaults.batch_size)
    settings.add_argument("--max-batch-delay", type=int, default=defaults.max_batch_delay, help="ms")
    settings.add_argument(
        "--omp-wait-policy",
        choices=OMP_WAIT_POLICIES,
        type=str.upper,
        help="OMP_WAIT_POLICY for the workers and the in-process run (default: PASSIVE, as shipped)",
    )
    settings.add_argument(
        "--log-config",
        type=check_log_config,
        default=SHIPPED,
        help=f"log4j2.xml for the TorchServe frontend, {BUILTIN!r} for TorchServe's own, "
        f"or {SHIPPED!r} for config.properties' (default)",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="measure every setting of SWEEP (or of --setting), fewer points each"
    )
    parser.add_argument(
        "--setting",
        type=Setting.parse,
        action="append",
        help="a setting to sweep, e.g. workers=1,threads=1,batch=32,delay=5,log=builtin,omp=active (repeatable)",
    )
    parser.add_argument(
        "--instance-concurrency",
        type=int,
        default=INSTANCE_CONCURRENCY,
        help=f"concurrent requests of the `instances` points (default: {INSTANCE_CONCURRENCY})",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the DLRM worker under load (flame graphs)")
    parser.add_argument("--output-dir", type=Path, help="where results go (default: a new folder in bench/results)")
    args = parser.parse_args(argv)
    if args.setting and not args.sweep:
        parser.error("--setting is for --sweep; a single run takes --workers, --threads, ...")
    return args


def chosen_settings(args: argparse.Namespace) -> list[Setting]:
    if args.sweep:
        return args.setting or list(SWEEP)
    single = Setting(args.workers, args.threads, args.batch_size, args.max_batch_delay, args.log_config)
    return [replace(single, omp_wait_policy=args.omp_wait_policy or "")]


def points_of(mode: Mode, instance_concurrency: int) -> list[Point]:
    return (
        [Point(1, concurrency) for concurrency in mode.concurrencies]
        + [Point(rows, instance_concurrency) for rows in mode.instance_rows]
        + [
            Point(rows, instance_concurrency, protocol)
            for protocol in (Protocol.OIP_JSON, Protocol.OIP_BINARY)
            for rows in mode.oip_rows
        ]
    )


def model_args(args: argparse.Namespace) -> list[str]:
    """build_mar.py's model options: the checkpoint, else the preset, then --archive-args."""
    model = (
        ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--preset", args.preset] if args.preset else []
    )
    return [*model, *shlex.split(args.archive_args)]


def build_archives(store: Path, build_args: list[str], setting: Setting) -> None:
    """``store/dlrm.mar`` from build_mar.py, and ``store/noop.mar`` with the same model-config.yaml."""
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    print("building: build_mar.py", shlex.join([*build_args, *setting.build_args()]), flush=True)
    build_archive(store / "dlrm.mar", *build_args, *setting.build_args())
    model_yaml = store / MODEL_YAML
    model_yaml.write_bytes(read_file(store / "dlrm.mar", MODEL_YAML))
    run_command(
        [
            executable("torch-model-archiver"), "--model-name", "noop", "--version", "1.0",
            "--handler", str(NOOP_HANDLER), "--config-file", str(model_yaml), "--export-path", str(store), "--force",
        ]
    )  # fmt: skip


def measure_inprocess(
    store: Path, setting: Setting, threads: int, batches: tuple[int, ...], seconds: float, modes: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """In-process timings of the archived model, in a process with the workers' environment and ``threads``."""
    output = store / "inprocess.json"
    command = [
        sys.executable, "-m", "bench.inprocess", str(store / "dlrm.mar"), "--threads", str(threads),
        "--batches", *map(str, batches), "--seconds", str(seconds), "--output", str(output),
        *(["--modes", *modes] if modes else []),
    ]  # fmt: skip
    run_command(command, stream=True, env={**os.environ, **setting.env()})
    return json.loads(output.read_text())


def serve(
    store: Path,
    model: str,
    setting: Setting,
    points: list[Point],
    bodies: dict[Point, list[Body]],
    mode: Mode,
    workdir: Path,
    profile_stem: str | None = None,
) -> tuple[list[PointResult], dict[str, dict[str, float]]]:
    """Serve ``model`` alone in a fresh TorchServe and measure ``points`` (and profiles) against it."""
    with TorchServeProcess(
        store, f"{model}={model}.mar", workdir, overrides=setting.overrides(), env=setting.env()
    ) as server:
        server.wait_ready(model)
        results = []
        for point in points:
            result = measure_point(server, model, point, bodies[point], workdir, mode.load_seconds, mode.warmup_seconds)
            print(
                f"{model} {point.name:<20} {result.req_per_s:>8,.0f} req/s {result.rows_per_s:>9,.0f} rows/s "
                f"p50 {result.latency_ms['p50']:7.1f} ms p99 {result.latency_ms['p99']:7.1f} ms "
                f"errors {result.http_errors}/{result.socket_errors} other load {result.other_cpu_cores:.2f} cores",
                flush=True,
            )
            results.append(result)
        profiles = {}
        if profile_stem is not None:
            for point in points:
                if point.concurrency > 1:
                    stem = Path(f"{profile_stem}-{point.rows_per_request}rows-c{point.concurrency}")
                    profiles[point.name] = profile.profile_under_load(
                        server, model, point, bodies[point], workdir, stem, mode.profile_seconds
                    )
        return results, profiles


def run_setting(
    setting: Setting,
    index: int,
    args: argparse.Namespace,
    mode: Mode,
    tmp: Path,
    output_dir: Path,
    built: list[list[str]],
) -> SettingResult:
    store = tmp / "store"
    if built != [setting.build_args()]:  # settings that differ only in logging share archives
        build_archives(store, model_args(args), setting)
        built[:] = [setting.build_args()]
    serving = serving_settings(store / "dlrm.mar")
    threads = serving.threads_per_worker()
    result = SettingResult(setting, setting.label, serving.to_model_yaml(), threads)
    print(f"\n== {setting.label}: torch threads per worker {threads}", flush=True)
    result.inprocess = measure_inprocess(store, setting, threads, mode.inprocess_batches, mode.inprocess_seconds)
    if mode.oip_rows:
        result.inprocess_all_threads = measure_inprocess(
            store, setting, threads * serving.workers, mode.oip_rows, mode.inprocess_seconds, modes=("model",)
        )
    inputs = criteo_like_inputs(model_artifact(store / "dlrm.mar").model, DISTINCT_ROWS)
    points = points_of(mode, args.instance_concurrency)
    bodies = {point: request_bodies(inputs, point.rows_per_request, point.protocol) for point in points}
    workdir = Path(tempfile.mkdtemp(prefix="ts-", dir=tmp))
    profile_stem = str(output_dir / f"profile-{index}") if args.profile else None
    result.served, result.profiles = serve(store, "dlrm", setting, points, bodies, mode, workdir, profile_stem)
    noop_points = [point for point in points if point.rows_per_request == 1] if args.sweep else points
    result.noop, _ = serve(store, "noop", setting, noop_points, bodies, mode, Path(tempfile.mkdtemp(dir=tmp)))
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = MODES[args.mode]
    if args.sweep:  # the points the targets need, for every setting
        mode = replace(mode, concurrencies=(1, 32), instance_rows=(256,), oip_rows=(), inprocess_batches=(1, 256))
    kind = "sweep" if args.sweep else "run"
    started = datetime.now(UTC)
    output_dir = args.output_dir or results_dir(f"{kind}-{args.mode}", started)
    output_dir.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "kind": kind,
        "mode": args.mode,
        "mode_settings": asdict(mode),
        "started": started.isoformat(timespec="seconds"),
        **machine_record(),
        "build_args": model_args(args),
        "instance_concurrency": args.instance_concurrency,
        "settings": [],
    }
    built: list[list[str]] = []
    clock = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dlrm-bench-") as tmp:
        for index, setting in enumerate(chosen_settings(args)):
            result = run_setting(setting, index, args, mode, Path(tmp), output_dir, built)
            if "machine_limit" not in document:  # once per run, for the model just measured
                artifact = model_artifact(Path(tmp) / "store" / "dlrm.mar")
                document["mlp_precision"] = machine_limit.served_precision(artifact)
                document["machine_limit"] = machine_limit.measure_in_subprocess(
                    artifact.model, args.mode, Path(tmp) / "machine-limit.json"
                )
            document["settings"].append({**asdict(result), "ratios": report.ratios(asdict(result))})
            write_results(output_dir, document)  # kept if a later setting fails
    document["duration_s"] = round(time.monotonic() - clock)
    document["loadavg_end"] = [round(load, 2) for load in os.getloadavg()]
    markdown = report.markdown(document)
    write_results(output_dir, document, markdown)
    report.plot(document, output_dir / "results.png")
    print(f"\n{markdown}\nresults: {output_dir}")


if __name__ == "__main__":
    main()
