"""TrimmedMean: the coordinate-wise trimmed mean of the task gradients (docs/METHODS.md, 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import multi_tensor
from fusedmtl.weighting.gradient_based import GradientWeighting


class TrimmedMean(GradientWeighting):
    """Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018 (the coordinate-wise trimmed mean), as torchjd's TrimmedMean.

    At every coordinate of every shared parameter, the K task gradients' values are sorted, the
    ``trim_number`` = t largest and t smallest are dropped, and the update is the mean of the
    K - 2t left: d = (1 / (K - 2t)) sum_i keep_i * g_i, keep_i the 0/1 mask of the coordinates
    where g_i's rank is in [t, K - t). t = 0 is the mean gradient; K = 2t + 1 the coordinate-wise
    median.

    Not Gramian-based: the masks come from one multi-tensor pass over the gradients
    (:func:`fusedmtl.multi_tensor.trim_`, no K x G copy nor K x numel(p) stack), and the
    masked gradients become the table the coefficients apply to; the coefficients are then
    1 / (K - 2t) for every task, and the logged norms and cosines are those of the kept parts.
    A task gradient that is None counts as zeros in the ranking. The masks multiply the
    gradients (rather than select), so a dropped inf or NaN still makes the step non-finite.
    ``coefficients(gramian)`` alone returns the constant 1 / (K - 2t): the method is in the
    masks.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`;
            K must be at least 2t + 1.
        trim_number: t >= 0, the number of values dropped at each end of every coordinate
            (torchjd has no default; 1, the median for K = 3).
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    needs_full_gramian = False

    def __init__(self, shared_params=None, tasks=None, *, trim_number: int = 1, **kwargs) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if trim_number < 0:
            raise ValueError(f"TrimmedMean: trim_number must be >= 0, got {trim_number}")
        self.trim_number = int(trim_number)
        self._check_count(self.num_tasks)

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"trim_number": 1 if num_tasks >= 3 else 0}

    def _check_count(self, k: int | None) -> None:
        if k is not None and k < 2 * self.trim_number + 1:
            raise ValueError(
                f"TrimmedMean: trim_number={self.trim_number} needs at least "
                f"{2 * self.trim_number + 1} tasks, got {k}"
            )

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        k = gramian.shape[0]
        self._check_count(k)
        return torch.full(
            (k,), 1.0 / (k - 2 * self.trim_number), dtype=gramian.dtype, device=gramian.device
        )

    def _task_table(self, shared, values, scale, representation, owned):
        # (the ranks do not change under the loss scale: the table keeps carrying it)
        if self.trim_number == 0:
            return shared, scale
        return trimmed_table(shared, self.trim_number, owned), scale


def trimmed_table(
    table: list[list[Tensor | None]], trim: int, owned: bool
) -> list[list[Tensor | None]]:
    """Every task gradient masked to the coordinates where its rank among the K is in
    [trim, K - trim), by :func:`fusedmtl.multi_tensor.trim_` (one pass, no K x numel stack).

    Args:
        table: K rows of P tensors (None: the task does not reach that tensor, taken as zeros).
        trim: the number of values dropped at each end, 2 * trim < K.
        owned: whether the gradients are this step's temporaries (then masked in place where
            contiguous; the others are copied first).

    Returns:
        K rows of P tensors of the gradients' shapes and dtypes (None where the input was None:
        zeros masked are zeros).
    """
    out = [
        [
            g
            if g is None or (owned and g.is_contiguous())
            else g.clone(memory_format=torch.contiguous_format)
            for g in row
        ]
        for row in table
    ]
    multi_tensor.trim_(out, trim)
    return out
