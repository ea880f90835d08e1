"""fusedmtl: fused regression losses, multi-tensor gradient kernels and multi-task weighting for
PyTorch.

    import fusedmtl
    loss = fusedmtl.smooth_l1_loss(pred, target)   # drop-in for torch.nn.functional
    criterion = fusedmtl.nn.MSELoss()              # drop-in for torch.nn
    loss = fusedmtl.heteroscedastic_loss(pred, target, log_var)  # Kendall & Gal 2017
    fusedmtl.backend.info()                        # what runs, for bug reports
    fusedmtl.weighting.MGDA, fusedmtl.multi_tensor.gramian   # imported on first use
"""

import importlib

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from fusedmtl import backend, losses, nn
from fusedmtl.losses import heteroscedastic_loss, huber_loss, l1_loss, mse_loss, smooth_l1_loss

__version__ = "0.1.0"
# Imported on first attribute access (as torch.nn.functional after import torch), so that
# `import fusedmtl` stays fast.
LAZY_SUBMODULES = ("demo", "linalg", "multi_tensor", "weighting")
__all__ = [
    "backend",
    "demo",
    "empty_cache",
    "heteroscedastic_loss",
    "huber_loss",
    "l1_loss",
    "linalg",
    "losses",
    "mse_loss",
    "multi_tensor",
    "nn",
    "smooth_l1_loss",
    "weighting",
]


def __getattr__(name: str):
    if name in LAZY_SUBMODULES:
        return importlib.import_module(f"fusedmtl.{name}")  # also binds fusedmtl.<name>
    raise AttributeError(f"module 'fusedmtl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_SUBMODULES))


def empty_cache() -> None:
    """Free the large CPU output buffers fusedmtl keeps for reuse.

    Like ``torch.cuda.empty_cache`` for the CPU: gradients and element-wise losses of 4 MiB or more
    are allocated from a cache of freed buffers, so a training loop does not page-fault on a fresh
    buffer every step. Its size is bounded by ``FUSEDMTL_CPU_CACHE_MB`` (default 1024; 0 disables
    it); ``fusedmtl.backend.info()["cpu_cache_bytes"]`` reports what it holds.
    """
    if backend._C is not None:
        backend._C.empty_cpu_cache()
