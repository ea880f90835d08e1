"""Fused ops of fusedmtl: the functional losses (losses.py, heteroscedastic.py), their pure-PyTorch reference
(naive.py) and the registrations of the compiled ops (native.py)."""

from fusedmtl.ops.heteroscedastic import heteroscedastic_loss
from fusedmtl.ops.losses import huber_loss, l1_loss, mse_loss, smooth_l1_loss

__all__ = ["heteroscedastic_loss", "huber_loss", "l1_loss", "mse_loss", "smooth_l1_loss"]
