"""Which implementation of fusedmtl's ops runs.

- ``'native'``: the compiled kernels of ``fusedmtl._C`` (CPU; CUDA when built with CUDA).
- ``'triton'``: Triton kernels, for CUDA tensors when the extension was built without CUDA.
- ``'reference'``: plain PyTorch (``fusedmtl.losses.reference``); runs on any device, and is what
  runs when the extension is missing (with one warning).

``'auto'`` (the default) picks per device: native where the extension supports the device, then
triton on CUDA, then reference. Force a choice for the whole process with the environment variable
``FUSEDMTL_BACKEND=auto|native|triton|reference`` or for a block of code with :func:`use`::

    with fusedmtl.backend.use("reference"):
        loss = fusedmtl.smooth_l1_loss(x, y)

:func:`info` reports what is available, for bug reports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

NAMES = ("auto", "native", "triton", "reference")
ENV_VAR = "FUSEDMTL_BACKEND"

try:
    from fusedmtl import _C
except ImportError as error:  # a source checkout without a build, or a broken build
    _C = None
    _C_IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    _C_IMPORT_ERROR = None


def _checked(name: str, origin: str) -> str:
    name = name.strip().lower()
    if name not in NAMES:
        raise ValueError(f"{origin}: unknown fusedmtl backend {name!r}; expected one of {NAMES}")
    return name


_forced = _checked(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
_warned_missing_extension = False


def native_available(device_type: str = "cpu") -> bool:
    """True if the compiled extension has kernels for this device type."""
    if _C is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(_C.WITH_CUDA))


def triton_available() -> bool:
    """True if Triton can be imported (its kernels still need CUDA or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(device_type: str) -> bool:
    """True if the Triton kernels can run on this device type (CPU only under the interpreter)."""
    if not triton_available():
        return False
    return device_type == "cuda" or (
        device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    )


def current() -> str:
    """The backend forced by :func:`use` or ``FUSEDMTL_BACKEND``, or ``'auto'``."""
    return _forced


def cpu_runs_native() -> bool:
    """select('cpu') == 'native', without building a device object (the losses' fast path asks
    this every call)."""
    return _C is not None and _forced in ("auto", "native")


def select(device: torch.device | str) -> str:
    """The backend that runs for tensors on ``device``: 'native', 'triton' or 'reference'."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if _forced == "reference":
        return "reference"
    if _forced == "native":
        if not native_available(device_type):
            raise RuntimeError(_native_unavailable_message(device_type))
        return "native"
    if _forced == "triton":
        if not triton_runs_on(device_type):
            raise RuntimeError(
                f"fusedmtl: the triton backend was forced but cannot run on {device_type!r} "
                "tensors: "
                "it needs triton and a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
            )
        return "triton"
    if native_available(device_type):
        return "native"
    if device_type == "cuda" and triton_available():
        return "triton"
    if _C is None:
        _warn_missing_extension()
    return "reference"


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Force a backend ('auto', 'native', 'triton' or 'reference') inside a ``with`` block."""
    global _forced
    previous, _forced = _forced, _checked(name, "fusedmtl.backend.use")
    try:
        yield
    finally:
        _forced = previous


def info() -> dict:
    """What is available, for bug reports: the extension, its CUDA support, Triton, the choice."""
    triton_version = None
    if triton_available():
        try:
            import triton

            triton_version = triton.__version__
        except Exception as error:  # noqa: BLE001 - reported, not raised
            triton_version = f"import failed: {error}"
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device_available": torch.cuda.is_available(),
        "extension": _C is not None,
        "extension_error": _C_IMPORT_ERROR,
        "extension_cuda": bool(_C.WITH_CUDA) if _C is not None else False,
        "cpu_capability": _C.cpu_capability() if _C is not None else None,
        "cpu_cache_bytes": _C.cpu_cache_bytes() if _C is not None else 0,
        "triton": triton_version,
        "forced": _forced,
        "selected": {"cpu": _safe_select("cpu"), "cuda": _safe_select("cuda")},
        "threads": torch.get_num_threads(),
    }


def _safe_select(device_type: str) -> str:
    try:
        return select(device_type)
    except RuntimeError as error:
        return f"unavailable ({error})"


def _native_unavailable_message(device_type: str) -> str:
    if _C is None:
        return (
            "fusedmtl: the native backend was forced but the extension failed to load: "
            f"{_C_IMPORT_ERROR}"
        )
    return (
        f"fusedmtl: the native backend has no kernels for {device_type!r} tensors"
        " (was the extension built with CUDA? see fusedmtl.backend.info())"
    )


def _warn_missing_extension() -> None:
    global _warned_missing_extension
    if not _warned_missing_extension:
        _warned_missing_extension = True
        warnings.warn(
            "fusedmtl: the compiled extension is not available, falling back to the pure-PyTorch "
            f"reference implementation (slower). Import error: {_C_IMPORT_ERROR}",
            RuntimeWarning,
            stacklevel=3,
        )


def device_guard(device: torch.device):
    """``device`` made the current CUDA device for a launch that runs on the current one (Triton's
    launches: without it cuda:1 tensors would run on cuda:0's device and stream); nothing for a CPU
    device (the Triton interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
