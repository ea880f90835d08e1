"""What the numbers depend on: versions, backend, threads, CPU/GPU, load, huge pages, date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

import fusedmtl
from bench.timing import ALL_THREADS


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peer_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The checkout's commit, with '+changes' when its tracked files differ from it."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", checkout, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(devices: str) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedmtl": fusedmtl.__version__,
        "fusedmtl_path": os.path.dirname(fusedmtl.__file__),
        "commit": git_commit(),
        "torchjd": peer_version("torchjd"),
        "backend": fusedmtl.backend.info(),
        "device": devices,
        "torch_default_threads": ALL_THREADS,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg": list(os.getloadavg()),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "transparent_hugepage": (_read("/sys/kernel/mm/transparent_hugepage/enabled") or "").strip()
        or None,
        "argv": sys.argv,
    }


def environment_line(env: dict) -> str:
    return (
        f"torch {env['torch']}, torchjd {env['torchjd'] or 'not installed'}, fusedmtl backend "
        f"{env['backend']['selected']}, CPU {env['cpu_model']} x{env['cpu_count']}, GPU "
        f"{env['gpu'] or 'none'}, {env['torch_default_threads']} threads, load "
        f"{env['loadavg'][0]:.2f}, THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}"
    )
