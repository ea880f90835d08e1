"""The benchmark's command line: ``python -m bench`` from a checkout (``make bench``).

  python -m bench                      # every sweep, full
  python -m bench --quick              # fewer sizes and repeats, 1 thread (about a minute)
  python -m bench --sweeps weighting_step,training_step --methods mgda,upgrad
  python -m bench --json out.json --plot plots/
  python -m bench --device cuda        # CUDA rows only ('auto' adds them when a GPU is present)

Sweeps (every ratio is between contenders of one row, one run): losses (fused losses vs eager,
torch.compile and, on a GPU, Triton), multi_tensor (multi-tensor ops vs torch._foreach and
flatten+cat), weighting_step (every gradient-based method's step vs flatten and torchjd),
training_step (a whole multi-task step per method vs plain PyTorch and torchjd).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from bench.environment import environment, environment_line
from bench.losses import Losses
from bench.multi_tensor import MultiTensor
from bench.sweep import Common, Sweep, check_targets
from bench.tables import Progress
from bench.timing import ALL_THREADS
from bench.training_step import TrainingStep
from bench.weighting_step import WeightingStep

SWEEPS: dict[str, Sweep] = {
    s.name: s for s in (Losses(), MultiTensor(), WeightingStep(), TrainingStep())
}
FULL_REPEATS, QUICK_REPEATS = 15, 5
FULL_WARMUP, QUICK_WARMUP = 3, 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--sweeps", default="all", help="comma-separated from " + ",".join(SWEEPS))
    add("--quick", action="store_true", help=f"fewer sizes, {QUICK_REPEATS} repeats, 1 thread")
    add(
        "--threads",
        help=f"thread counts, 'all' = torch's default ({ALL_THREADS}); default 1,all "
        "(weighting_step, training_step: 1; --quick: 1)",
    )
    add("--repeats", type=int, help=f"timed samples per contender and row ({FULL_REPEATS})")
    add("--warmup", type=int, help=f"untimed rounds per row ({FULL_WARMUP})")
    add("--device", default="auto", help="auto (cpu, and cuda when present), cpu, cuda")
    add("--json", metavar="PATH", help="write the environment and one record per measurement")
    add("--plot", metavar="DIR", help="write PNG figures (matplotlib) into DIR")
    add("--no-progress", action="store_true", help="no progress bar")
    for sweep in SWEEPS.values():
        sweep.add_arguments(p.add_argument_group(f"{sweep.name} sweep"))
    return p


def devices(text: str) -> list[str]:
    if text == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    chosen = [d.strip() for d in text.split(",") if d.strip()]
    if any(d.startswith("cuda") for d in chosen) and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here")
    return chosen


def threads(text: str) -> list[int]:
    counts = [ALL_THREADS if item.strip() == "all" else int(item) for item in text.split(",")]
    return list(dict.fromkeys(counts))


def configs(args) -> list[tuple[Sweep, object]]:
    names = list(SWEEPS) if args.sweeps == "all" else [s.strip() for s in args.sweeps.split(",")]
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        raise ValueError(f"unknown sweeps {unknown}; expected some of {list(SWEEPS)}")
    out = []
    for device in devices(args.device):
        for name in names:
            sweep = SWEEPS[name]
            counts = threads(args.threads or ("1" if args.quick else sweep.full_threads))
            common = Common(
                threads=counts if device == "cpu" else counts[-1:],  # one setting on a GPU
                repeats=args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS),
                warmup=args.warmup
                if args.warmup is not None
                else (QUICK_WARMUP if args.quick else FULL_WARMUP),
                device=device,
            )
            out.append((sweep, sweep.config(args, common)))
    return out


def freeze_import_time_objects() -> None:
    """Moves everything alive now (torch, Dynamo, the modules) out of the garbage collector's
    reach: every row starts with a full collection, which would otherwise walk the whole import
    heap (0.1-0.5 s) each time."""
    import torch._dynamo  # noqa: F401  (imported lazily by torch.optim and torch.compile)

    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        chosen = configs(args)
        if args.plot:
            import matplotlib  # noqa: F401
    except ValueError as error:
        p.error(str(error))
    except ImportError:
        p.error("--plot needs matplotlib (pip install matplotlib)")
    freeze_import_time_objects()
    env = environment(",".join(devices(args.device)))
    print(environment_line(env), file=sys.stderr)
    started = time.perf_counter()
    results = []
    with Progress(enabled=not args.no_progress) as progress:
        for sweep, config in chosen:
            progress.start(f"{sweep.name} ({config.device})", sweep.planned_rows(config))
            began = time.perf_counter()
            rows = sweep.run(config, progress)
            elapsed = round(time.perf_counter() - began, 1)
            results.append((sweep, config, rows, elapsed))
            print()
            if rows:
                sweep.report(rows)
            print(f"({sweep.name} on {config.device}: {elapsed} s, load {os.getloadavg()[0]:.2f})")
    env["loadavg_end"] = list(os.getloadavg())
    env["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(
        f"\n({env['elapsed_s']} s in all; load {env['loadavg'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end, {os.cpu_count()} CPUs)"
    )
    if args.json:
        document = {
            "environment": env,
            "sweeps": [
                {"sweep": s.name, "device": c.device, "elapsed_s": e, "config": asdict(c)}
                for s, c, _, e in results
            ],
            "records": [
                record for _, _, rows, _ in results for row in rows for record in row.records()
            ],
            "targets": {
                f"{s.name}/{c.device}": check_targets(s.name, rows) for s, c, rows, _ in results
            },
        }
        with open(args.json, "w") as out:
            json.dump(document, out, indent=1)
            out.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        from bench.plots import write_plots

        paths = write_plots([row for _, _, rows, _ in results for row in rows], args.plot)
        print(f"wrote {len(paths)} figure(s) into {args.plot}")
    return 0
