"""fusedmtl: fused regression losses, multi-tensor gradient kernels and multi-task weighting for
PyTorch.

    import fusedmtl
    loss = fusedmtl.smooth_l1_loss(pred, target)   # drop-in for torch.nn.functional
    criterion = fusedmtl.nn.MSELoss()              # drop-in for torch.nn
    fusedmtl.backend.info()                        # what runs, for bug reports
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from fusedmtl import backend

if backend._C is not None:
    from fusedmtl.ops import native as _native  # noqa: F401  (fake and autograd registrations)

from fusedmtl import nn, ops
from fusedmtl.ops import huber_loss, l1_loss, mse_loss, smooth_l1_loss

__version__ = "0.1.0"
__all__ = ["backend", "huber_loss", "l1_loss", "mse_loss", "nn", "ops", "smooth_l1_loss"]
