"""Fused ops of fusedmtl: the functional losses (losses.py), their pure-PyTorch reference
(naive.py) and the registrations of the compiled ops (native.py)."""

from fusedmtl.ops.losses import huber_loss, l1_loss, mse_loss, smooth_l1_loss

__all__ = ["huber_loss", "l1_loss", "mse_loss", "smooth_l1_loss"]
