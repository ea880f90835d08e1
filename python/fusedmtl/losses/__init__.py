"""Layer 1, the fused losses: the functional API (functional.py, heteroscedastic.py), its
pure-PyTorch reference (reference.py), the registrations of the compiled ops (native.py, autograd.py)
and the Triton kernels (triton.py, triton_heteroscedastic.py)."""

from fusedmtl.losses.functional import huber_loss, l1_loss, mse_loss, smooth_l1_loss
from fusedmtl.losses.heteroscedastic import heteroscedastic_loss

__all__ = ["heteroscedastic_loss", "huber_loss", "l1_loss", "mse_loss", "smooth_l1_loss"]
