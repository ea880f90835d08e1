"""The interface every sweep implements (:class:`Sweep`), the row it produces (:class:`Row`)
and the speed targets of targets.json checked against its rows."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.tables import Progress
from bench.timing import Stats

REFERENCE = "fused"  # the contender every ratio is taken against
TARGETS_PATH = Path(__file__).with_name("targets.json")


@dataclass
class Row:
    """The measurements of one row: what it is (``fields``, e.g. loss, N, threads: its id), what
    was found about it (``info``, e.g. a compile time) and, per contender, its timing, its peak
    extra memory and the cosine between its update and fused's."""

    sweep: str
    fields: dict
    stats: dict[str, Stats]
    peak_bytes: dict[str, int | None] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    bytes: int | None = None  # least traffic of memory-bound rows
    bandwidth_gbs: float | None = None
    notes: dict[str, str] = field(default_factory=dict)  # contender -> why it did not run
    info: dict = field(default_factory=dict)

    def __getattr__(self, name: str):
        for part in ("fields", "info"):
            if name in self.__dict__.get(part, {}):
                return self.__dict__[part][name]
        raise AttributeError(name)

    @property
    def row_id(self) -> str:
        return "|".join(str(value) for value in self.fields.values())

    def median(self, contender: str) -> float | None:
        stats = self.stats.get(contender)
        return stats.median_ms if stats else None

    def ratio(self, contender: str) -> float | None:
        """contender's median / fused's: how many times faster fused is (>1: fused wins)."""
        mine, fused = self.median(contender), self.median(REFERENCE)
        return mine / fused if mine and fused else None

    @property
    def bound_ms(self) -> float | None:
        if self.bytes is None or not self.bandwidth_gbs:
            return None
        return self.bytes / (self.bandwidth_gbs * 1e9) * 1e3

    def fraction_of_bound(self, contender: str = REFERENCE) -> float | None:
        median, bound = self.median(contender), self.bound_ms
        return bound / median if median and bound else None

    def records(self) -> list[dict]:
        """One flat JSON record per contender."""
        out = []
        for contender, stats in self.stats.items():
            out.append(
                {
                    "sweep": self.sweep,
                    "row_id": self.row_id,
                    **self.fields,
                    **self.info,
                    "contender": contender,
                    "median_ms": stats.median_ms,
                    "min_ms": stats.min_ms,
                    "iqr_ms": stats.iqr_ms,
                    "samples_ms": stats.samples_ms,
                    "ratio_to_fused": self.ratio(contender),
                    "peak_bytes": self.peak_bytes.get(contender),
                    "cosine_to_fused": self.cosine.get(contender),
                    "max_rel_diff_from_fused": self.max_rel_diff.get(contender),
                    "bytes": self.bytes,
                    "bandwidth_gbs": self.bandwidth_gbs,
                    "bound_ms": self.bound_ms,
                    "fraction_of_bound": self.fraction_of_bound(contender),
                }
            )
        for contender, note in self.notes.items():
            out.append(
                {
                    "sweep": self.sweep,
                    "row_id": self.row_id,
                    **self.fields,
                    "contender": contender,
                    "skipped": note,
                }
            )
        return out


@dataclass
class Common:
    """The options every sweep takes."""

    threads: Sequence[int]
    repeats: int
    warmup: int
    device: str


class Sweep:
    """One sweep of the benchmark. A subclass names itself and its contenders, adds its options,
    builds its config, and runs it into rows; the command line does the rest (progress, the
    table, the JSON, the targets)."""

    name: str = ""
    contenders: tuple[str, ...] = ()
    full_threads: str = "1,all"  # thread counts of a full run (--threads overrides)

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Options of this sweep only (they need unique names across sweeps)."""

    def config(self, args: argparse.Namespace, common: Common) -> object:
        raise NotImplementedError

    def planned_rows(self, config) -> int:
        raise NotImplementedError

    def run(self, config, progress: Progress) -> list[Row]:
        raise NotImplementedError

    def report(self, rows: Sequence[Row]) -> None:
        """Prints the sweep's tables."""
        raise NotImplementedError


def cosine_and_diff(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, largest absolute difference over the reference's largest magnitude)
    of two updates, in float64."""
    a, b = value.detach().double().flatten(), reference.detach().double().flatten()
    cosine = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))
    return cosine, float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def load_targets(path: Path = TARGETS_PATH) -> dict[str, list[dict]]:
    return json.loads(path.read_text())["targets"]


def check_targets(
    sweep: str, rows: Sequence[Row], targets: dict[str, list[dict]] | None = None
) -> list[dict]:
    """For each target of the sweep: the worst ratio over the rows its ``where`` matches, and
    PASS (>= min_ratio), MISS or n/a (no such row ran). The ratio is 'against''s median over
    fused's, or over that of the contender ``of`` names."""
    results = []
    for target in (targets if targets is not None else load_targets()).get(sweep, []):
        of = target.get("of", REFERENCE)  # the contender the target is about
        ratios = {
            row.row_id: (
                row.ratio(target["against"])
                if of == REFERENCE
                else _ratio(row.median(target["against"]), row.median(of))
            )
            for row in rows
            if all(row.fields.get(k) == v for k, v in target["where"].items())
        }
        ratios = {k: v for k, v in ratios.items() if v is not None}
        worst = min(ratios, key=ratios.get) if ratios else None
        status = (
            "n/a" if worst is None else ("PASS" if ratios[worst] >= target["min_ratio"] else "MISS")
        )
        results.append(
            {
                **target,
                "status": status,
                "worst_row": worst,
                "worst_ratio": ratios.get(worst),
                "ratios": ratios,
            }
        )
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets_line(sweep: str, results: Sequence[dict]) -> str | None:
    if not results:
        return None
    return f"{sweep} targets (worst row, fused speed-up): " + " | ".join(
        f"{r['label']}: {r['status']}"
        + ("" if r["worst_ratio"] is None else f" ({r['worst_ratio']:.2f}x)")
        for r in results
    )
