"""The table of loss kinds: one row per regression loss and per heteroscedastic loss.

Everything that lists the kinds reads it: the functional API and the nn modules (names and
defaults), the reference (``reference.KINDS``), the Triton kernels (their kind codes), the tests
(every kind runs the shared suites) and the benchmark (``from fusedmtl.losses import
REGRESSION_KINDS``). The C++ side has the same list once, as the X-macro of
csrc/losses/loss_kinds.h; ``code`` is its ``LossKind`` value (a test checks the two agree).

Adding a kind: a row here, a line in loss_kinds.h, its element math in loss_math.h, reference.py
and triton.py, and its public function and module (functional.py, nn.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

__all__ = [
    "HETEROSCEDASTIC_KINDS",
    "REGRESSION_KINDS",
    "HeteroscedasticKind",
    "RegressionKind",
    "check_heteroscedastic",
    "heteroscedastic_kind",
    "regression_kind",
]


@dataclass(frozen=True)
class RegressionKind:
    """A regression loss of d = input - target.

    Attributes:
        name: the kind string of the ops (``torch.ops.fusedmtl.regression_loss(..., kind, ...)``).
        code: C++ ``LossKind`` value (csrc/losses/loss_kinds.h), also the Triton kernels' KIND.
        function: the public function, ``fusedmtl.<function>`` and
            ``torch.nn.functional.<function>``.
        module: the nn module, ``fusedmtl.nn.<module>`` subclassing ``torch.nn.<module>``.
        param_name: the keyword of its parameter ('beta', 'delta'), or None.
        default_param: that parameter's default (torch's), or None.
        at_zero: the kind the loss is when its parameter is 0 (smooth-L1 with beta = 0 is L1,
            as in torch), which makes 0 a valid value; None: the parameter must be positive.
        docs: the section of docs/METHODS.md with its formula.
    """

    name: str
    code: int
    function: str
    module: str
    param_name: str | None = None
    default_param: float | None = None
    at_zero: str | None = None
    docs: str = "docs/METHODS.md, section 1"

    @property
    def torch_function(self):
        """The torch.nn.functional function this kind replaces."""
        return getattr(F, self.function)


@dataclass(frozen=True)
class HeteroscedasticKind:
    """A heteroscedastic loss w * (exp(-s) * b(d) + s) of a base regression loss b.

    Attributes:
        name: the ``kind`` argument of :func:`fusedmtl.heteroscedastic_loss`.
        code: the C++ ``LossKind`` of its base loss b (csrc/losses/loss_kinds.h).
        weight: the leading factor w (0.5 for the Gaussian 'l2', 1 otherwise).
        uses_beta: whether ``beta`` enters the formula (smooth-L1's threshold).
    """

    name: str
    code: int
    weight: float
    uses_beta: bool = False


REGRESSION_KINDS: tuple[RegressionKind, ...] = (
    RegressionKind("l1", 0, "l1_loss", "L1Loss"),
    RegressionKind("mse", 1, "mse_loss", "MSELoss"),
    RegressionKind("smooth_l1", 2, "smooth_l1_loss", "SmoothL1Loss", "beta", 1.0, at_zero="l1"),
    RegressionKind("huber", 3, "huber_loss", "HuberLoss", "delta", 1.0),
)

HETEROSCEDASTIC_KINDS: tuple[HeteroscedasticKind, ...] = (
    HeteroscedasticKind("l2", 1, 0.5),
    HeteroscedasticKind("l1", 0, 1.0),
    HeteroscedasticKind("smooth_l1", 2, 1.0, uses_beta=True),
)

_REGRESSION = {k.name: k for k in REGRESSION_KINDS}
_HETEROSCEDASTIC = {k.name: k for k in HETEROSCEDASTIC_KINDS}


def regression_kind(name: str) -> RegressionKind:
    """The row of a regression kind.

    Args:
        name: the kind's name ('l1', 'mse', ...).

    Returns:
        Its :class:`RegressionKind`; ValueError naming the valid kinds for an unknown name.
    """
    try:
        return _REGRESSION[name]
    except KeyError:
        raise ValueError(
            f"unknown loss kind {name!r}; expected one of {tuple(_REGRESSION)}"
        ) from None


def heteroscedastic_kind(name: str) -> HeteroscedasticKind:
    """The row of a heteroscedastic kind.

    Args:
        name: the kind's name ('l2', 'l1', 'smooth_l1').

    Returns:
        Its :class:`HeteroscedasticKind`; ValueError naming the valid kinds for an unknown name.
    """
    try:
        return _HETEROSCEDASTIC[name]
    except KeyError:
        raise ValueError(
            f"{name!r} is not a valid heteroscedastic loss kind; expected one of "
            f"{tuple(_HETEROSCEDASTIC)}"
        ) from None


def check_heteroscedastic(kind: str, beta: float) -> HeteroscedasticKind:
    """The arguments of a heteroscedastic loss that do not depend on the tensors, checked as every
    backend checks them (the C++ ops as well).

    Args:
        kind: a heteroscedastic kind's name.
        beta: smooth-L1's threshold (checked whatever the kind).

    Returns:
        The row of ``kind``; ValueError naming the valid kinds for an unknown one, RuntimeError
        for a negative beta.
    """
    row = heteroscedastic_kind(kind)
    if beta < 0:
        raise RuntimeError("heteroscedastic_loss does not support negative values for beta.")
    return row
