"""``python -m modelcache_kserve``: the container command of an InferenceService.

Every flag can come from an environment variable ``MODELCACHE_<FLAG>`` (``--device-budget`` ->
``MODELCACHE_DEVICE_BUDGET``); a flag on the command line wins over its variable.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from modelcache import ModelCache, parse_bytes

from ._server import build_server

__all__ = ["load_class", "main", "parse_args"]

logger = logging.getLogger("modelcache_kserve")

_TRUE = {"1", "true", "yes", "on"}


def _env(flag: str) -> str:
    return "MODELCACHE_" + flag.removeprefix("--").replace("-", "_").upper()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with defaults from ``MODELCACHE_*`` environment variables."""
    parser = argparse.ArgumentParser(
        prog="python -m modelcache_kserve",
        description="Serve every model of a store through one modelcache, with KServe's V1 and "
        "V2 protocols. Each flag may instead be set as MODELCACHE_<FLAG> (e.g. "
        "MODELCACHE_DEVICE_BUDGET).",
        allow_abbrev=False,
    )

    def add(flag: str, help: str, *, required: bool = False, **kwargs: object) -> None:
        default = os.environ.get(_env(flag), kwargs.pop("default", None))
        parser.add_argument(
            flag,
            default=default,
            required=required and default is None,
            help=f"{help} [env {_env(flag)}]",
            **kwargs,  # type: ignore[arg-type]
        )

    add(
        "--store",
        "URL template with {model_id}, e.g. s3://bucket/models/{model_id}/",
        required=True,
    )
    add(
        "--model-class",
        "pkg.module:Class building the models (a torch.nn.Module built from config.json, or a "
        "class with from_weights); the current directory is on the import path",
        required=True,
    )
    add("--device", "device of the hot tier: cpu, cuda, cuda:1...", default="cpu")
    add("--device-budget", "bytes of models on the device, e.g. 40GiB", required=True)
    add("--host-budget", "bytes of host memory for models evicted from the device", default="0")
    add("--disk-dir", "directory of the disk tier (remote stores only)")
    add("--disk-budget", "bytes of the disk tier")
    add("--max-concurrent-loads", "loads of different models at once", default="4", type=int)
    add(
        "--load-timeout",
        "seconds a request may wait for its model to load before it answers 503 (0: no limit)",
        default="300",
        type=float,
    )
    add(
        "--check-timeout",
        "seconds a readiness, metadata or unload check may wait for the store before it "
        "answers 503 (0: no limit)",
        default="5",
        type=float,
    )
    add(
        "--grace-period",
        "seconds requests in progress may take to finish after SIGTERM before they are "
        "cancelled; keep it below the pod's terminationGracePeriodSeconds",
        default="25",
        type=int,
    )
    add(
        "--max-request-size",
        "largest request body, e.g. 64MiB; larger ones answer 413 (0: no limit)",
        default="64MiB",
    )
    add(
        "--body-timeout",
        "seconds a request's body may take to arrive; a client that stalls mid-body gets 408 "
        "(0: no limit)",
        default="60",
        type=float,
    )
    add(
        "--revalidate-after",
        "seconds after which a hit on a model checks its version in the store, in the "
        "background (0: every hit; negative: never)",
        default="60",
        type=float,
    )
    add("--http-port", "HTTP port (0: any free port, printed when ready)", default="8080", type=int)
    add("--host", "address to bind", default="0.0.0.0")
    add(
        "--workers",
        "HTTP worker processes; must be 1 (one cache per process)",
        default="1",
        type=int,
    )
    per_model = os.environ.get(_env("--per-model-metrics"), "").lower() in _TRUE
    parser.add_argument(
        "--per-model-metrics",
        action="store_true",
        default=per_model,
        help="label metrics by model id too (one series per id ever served) "
        f"[env {_env('--per-model-metrics')}=1]",
    )
    args = parser.parse_args(argv)
    if args.workers != 1:
        parser.error(
            "--workers must be 1: the cache is one process's memory; run more replicas instead"
        )
    for flag in ("load_timeout", "check_timeout", "grace_period", "body_timeout"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must not be negative")
    try:
        args.max_request_size = parse_bytes(args.max_request_size, name="--max-request-size")
    except ValueError as exc:
        parser.error(str(exc))
    if (args.disk_dir is None) != (args.disk_budget is None):
        parser.error("--disk-dir and --disk-budget go together")
    return args


def load_class(spec: str) -> type:
    """Import ``pkg.module:Class`` (the current directory first on the path, as ``python -m``)."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"--model-class must look like pkg.module:Class, not {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    target: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not isinstance(target, type):
        raise TypeError(f"{spec} is not a class")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_class = load_class(args.model_class)
    cache = ModelCache(
        args.store,
        device=args.device,
        device_budget=args.device_budget,
        host_budget=args.host_budget,
        disk_dir=args.disk_dir,
        disk_budget=args.disk_budget,
        max_concurrent_loads=args.max_concurrent_loads,
        revalidate_after=None if args.revalidate_after < 0 else args.revalidate_after,
    )
    server = build_server(
        cache,
        model_class,
        host=args.host,
        http_port=args.http_port,
        per_model_metrics=args.per_model_metrics,
        load_timeout=args.load_timeout or None,
        check_timeout=args.check_timeout or None,
        grace_period=args.grace_period,
        max_request_bytes=args.max_request_size or None,
        body_timeout=args.body_timeout or None,
    )

    def ready(port: int) -> None:
        # One line on stdout, for people and for scripts that wait for it.
        print(
            f"modelcache-kserve ready on http://{args.host}:{port} serving {args.store} "
            f"({args.model_class}, device {cache.device}, budget {args.device_budget})",
            flush=True,
        )

    server.start(on_ready=ready)
    return 0
