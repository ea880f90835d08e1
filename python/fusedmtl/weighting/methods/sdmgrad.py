"""SDMGrad: stochastic direction-oriented multi-objective gradient (docs/METHODS.md, 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.methods.modo import project_onto_simplex


class SDMGrad(GradientWeighting):
    """Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS 2023 (Algorithm 1), as torchjd's SDMGradWeighting.

    With A = M / (mean_i sqrt(M_ii) ^ 2 + 1e-8) (the paper's code's normalisation, so the
    inner step size does not depend on the gradients' scale) and w~ the preference (1/K by
    default), the weights w (on the simplex, from 1/K, kept across steps) take ``n_iter``
    projected momentum steps on 1/2 (w + lambda w~)^T A (w + lambda w~):
    v <- momentum v + A (w + lambda w~) (v = the first gradient at first),
    w <- Proj_simplex(w - lr v); then c = (w + lambda w~) / (1 + lambda), the convex mix of the
    min-norm direction and the preferred one. The paper's A is J_1 J_2^T from two independent
    mini-batches; here it is the step's Gramian, of one batch (LibMTL's SDMGrad with one batch).
    w is a float64 buffer of the state_dict, moved to the Gramian's device on first use (no host
    synchronisation); it is not updated on skipped steps.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        lr: the inner step size, > 0 (default 10, as torchjd and the paper's code).
        momentum: the inner momentum in [0, 1) (0.5).
        n_iter: inner steps per step, >= 1 (20).
        lambda_: the pull towards the preferred direction, >= 0 (0.3, the paper's experiments).
        pref_vector: ``Tensor[K]``, w~, or None for 1/K.
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not lr > 0 or not 0 <= momentum < 1 or n_iter < 1 or not lambda_ >= 0:
            raise ValueError(
                "SDMGrad: needs lr > 0, momentum in [0, 1), n_iter >= 1 and lambda_ >= 0, got "
                f"{lr}, {momentum}, {n_iter}, {lambda_}"
            )
        self.lr, self.momentum, self.n_iter, self.lambda_ = (
            float(lr),
            float(momentum),
            int(n_iter),
            float(lambda_),
        )
        k = self.num_tasks
        if pref_vector is not None:
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64).reshape(-1).clone()
            if k is not None and pref_vector.numel() != k:
                raise ValueError(f"SDMGrad: pref_vector must be {k} floats, got {pref_vector}")
        self.pref_vector = pref_vector
        k = k or 0  # 0: sized by the first Gramian (coefficients-only use)
        self.register_buffer("weights", torch.full((k,), 1.0 / max(k, 1), dtype=torch.float64))

    def _init_task_state(self) -> None:
        k = self.num_tasks
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=self.weights.device)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        M = gramian.detach().to(torch.float64)
        k = M.shape[0]
        if self.pref_vector is None:
            preferred = torch.full((k,), 1.0 / k, dtype=torch.float64, device=M.device)
        else:
            preferred = self.pref_vector.to(M.device)
        scale = M.diagonal().clamp_min(0).sqrt().mean()
        A = M / (scale * scale + 1e-8)
        w = self.weights.to(M.device)
        velocity = None
        for _ in range(self.n_iter):
            grad = A @ (w + self.lambda_ * preferred)
            velocity = grad if velocity is None else self.momentum * velocity + grad
            w = project_onto_simplex(w - self.lr * velocity)
        self.weights = w
        return ((w + self.lambda_ * preferred) / (1 + self.lambda_)).to(gramian.dtype)
