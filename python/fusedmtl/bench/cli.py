"""The command line of ``fusedmtl-bench`` (also ``python -m fusedmtl.bench``; ``make bench``).

  fusedmtl-bench                      # every sweep, full (under ten minutes on 2 cores)
  fusedmtl-bench --quick              # every sweep, fewer sizes and repeats, 1 thread (~1 min)
  fusedmtl-bench --sweeps weighting_step,training_step --methods mgda,upgrad --threads 1
  fusedmtl-bench --json out.json --plot plots/
  fusedmtl-bench --device cuda        # only CUDA rows (CUDA events); the default 'auto' adds
                                      # them to the CPU rows when a GPU is present

Sweeps (each a module of this package; every ratio is between contenders of one row, one run):
  losses          fused losses vs Triton (GPU) / eager / torch.compile, forward+backward
  multi_tensor    multi-tensor ops vs torch._foreach and flatten+cat
  weighting_step  every gradient-based weighting's step vs the same step done the flatten way
  training_step   a whole multi-task training step per weighting vs plain PyTorch (and torchjd,
                  LibMTL when importable)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from fusedmtl.bench import losses, multi_tensor, training, weighting
from fusedmtl.bench.common import (
    ALL_THREADS, DEFAULT_WARMUP, Progress, environment, environment_line, parse_choices,
    parse_threads,
)

SWEEPS = {
    losses.NAME: losses, multi_tensor.NAME: multi_tensor, weighting.NAME: weighting,
    training.NAME: training,
}
FULL_REPEATS, QUICK_REPEATS = 15, 5
QUICK_WARMUP = 1
FULL_THREADS, QUICK_THREADS = "1,all", "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedmtl-bench",
        description="Benchmarks of fusedmtl: interleaved repetitions, medians, ratios from one "
        "run, copy-bandwidth bounds. Sweeps: " + ", ".join(SWEEPS) + ".",
    )
    add = parser.add_argument
    add("--sweeps", default="all", help="comma-separated from " + ",".join(SWEEPS) + "; default all")
    add("--quick", action="store_true",
        help=f"fewer sizes and repeats ({QUICK_REPEATS}), {QUICK_THREADS} thread: about a minute")
    add("--threads", help=f"comma-separated thread counts, 'all' = torch's default "
        f"({ALL_THREADS}); default {FULL_THREADS} (weighting_step and training_step: 1; --quick: "
        f"{QUICK_THREADS})")
    add("--repeats", type=int, help=f"timed samples per contender and row (default "
        f"{FULL_REPEATS}; --quick: {QUICK_REPEATS})")
    add("--warmup", type=int, help=f"untimed rounds per row (default {DEFAULT_WARMUP}; "
        f"--quick: {QUICK_WARMUP})")
    add("--device", default="auto",
        help="auto (default: cpu, then cuda too when a GPU is present), cpu, cuda or cpu,cuda")
    add("--json", metavar="PATH", help="write the environment and one record per measurement")
    add("--plot", metavar="DIR", help="write PNG figures (matplotlib) into DIR")
    add("--no-progress", action="store_true", help="no progress bar")
    for module in SWEEPS.values():
        module.add_arguments(parser)
    return parser


def devices(text: str) -> list[str]:
    if text == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    for device in chosen:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: CUDA is not available here")
    return chosen


def configs_from_args(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(sweep name, config) for every chosen sweep and device."""
    names = parse_choices(args.sweeps, tuple(SWEEPS), "sweeps")
    configs = []
    for device in devices(args.device):
        for name in names:
            # A sweep may default to fewer thread counts (FULL_THREADS) to keep the full run short.
            default = QUICK_THREADS if args.quick else getattr(SWEEPS[name], "FULL_THREADS", FULL_THREADS)
            threads = parse_threads(args.threads or default)
            common = {
                # Thread count changes nothing a GPU does: one setting is enough there.
                "threads": threads if device == "cpu" else threads[-1:],
                "repeats": args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS),
                "warmup": args.warmup if args.warmup is not None
                else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP),
                "device": device,
            }
            configs.append((name, SWEEPS[name].config_from_args(args, common)))
    return configs


def json_config(config) -> dict:
    return {key: list(value) if isinstance(value, (tuple, list)) else value
            for key, value in asdict(config).items()}


def freeze_import_time_objects() -> None:
    """Moves everything alive now (torch, Dynamo -- which optimizers and torch.compile import --,
    the modules) out of the garbage collector's reach. Every row starts with a full collection,
    so that no contender pays for another's garbage; without this each one walks the whole import
    heap, about 0.1-0.5 s, which dominated the short runs."""
    import gc

    import torch._dynamo  # noqa: F401  (imported lazily by torch.optim and torch.compile)

    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    freeze_import_time_objects()
    env = environment(",".join(devices(args.device)))
    print(environment_line(env), file=sys.stderr)
    started = time.perf_counter()
    results: list[tuple[str, object, list]] = []
    with Progress(enabled=not args.no_progress) as progress:
        for name, config in configs:
            module = SWEEPS[name]
            progress.start(f"{name} ({config.device})", module.planned_rows(config))
            sweep_started = time.perf_counter()
            rows = module.run(config, progress)
            progress.finish()
            elapsed = round(time.perf_counter() - sweep_started, 1)
            results.append((name, config, rows, elapsed))
            # Each sweep's table as soon as it is done (rich prints it above the progress bar).
            print()
            module.report(rows)
            print(f"({name} on {config.device}: {elapsed} s, 1-minute load average "
                  f"{os.getloadavg()[0]:.2f} at its end)")
    env["loadavg_end"] = list(os.getloadavg())
    env["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(
        f"\n({env['elapsed_s']} s in all; 1-minute load average {env['loadavg'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end, on {os.cpu_count()} CPUs)"
    )

    if args.json:
        document = {
            "environment": env,
            "sweeps": [
                {"sweep": name, "device": config.device, "elapsed_s": elapsed,
                 "config": json_config(config)}
                for name, config, _, elapsed in results
            ],
            "records": [record for name, _, rows, _ in results
                        for record in SWEEPS[name].records(rows)],
            "targets": {
                f"{name}/{config.device}": SWEEPS[name].check_targets(rows)
                for name, config, rows, _ in results if hasattr(SWEEPS[name], "check_targets")
            },
        }
        with open(args.json, "w") as out:
            json.dump(document, out, indent=1)
            out.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        from fusedmtl.bench.plots import write_plots

        paths = []
        for name, config, rows, _ in results:
            paths += write_plots({name: rows}, args.plot)
        print(f"wrote {len(paths)} figure(s) into {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
