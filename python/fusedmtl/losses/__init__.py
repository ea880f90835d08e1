"""Layer 1, the fused losses: the table of loss kinds (kinds.py), the functional API (functional.py,
heteroscedastic.py), its pure-PyTorch reference (reference.py), the registrations of the compiled
ops (native.py, autograd.py) and the Triton kernels of both families (triton.py).

``REGRESSION_KINDS`` and ``HETEROSCEDASTIC_KINDS`` are the table every list of kinds reads (tests,
benchmark): one row per kind with its name, C++ code, public function, module and parameter.
"""

from fusedmtl.losses.functional import huber_loss, l1_loss, mse_loss, smooth_l1_loss
from fusedmtl.losses.heteroscedastic import heteroscedastic_loss
from fusedmtl.losses.kinds import HETEROSCEDASTIC_KINDS, REGRESSION_KINDS

__all__ = [
    "HETEROSCEDASTIC_KINDS",
    "REGRESSION_KINDS",
    "heteroscedastic_loss",
    "huber_loss",
    "l1_loss",
    "mse_loss",
    "smooth_l1_loss",
]
