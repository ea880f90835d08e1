"""PCD: priority-constrained descent (docs/METHODS.md, section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting import solvers
from fusedmtl.weighting.gradient_based import GradientWeighting


class PCD(GradientWeighting):
    """Priority-Constrained Descent: "Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization", TMLR 2026 (arXiv:2606.29521), as
    torchjd's PCD.

    Task 0 is the primary objective. With s_i = 1 / sqrt(v_i + eps) (v_i the bias-corrected EMA,
    rate ``beta``, of norm(g_i)^2 over the steps) and g~_i = s_i g_i, the direction is
    d~ = argmin_d 1/2 norm(d - g~_0)^2 subject to <g~_j, d> >= tau_j norm(g~_j)^2 for every
    secondary task j: as close to the primary gradient as possible while every secondary task
    gets the fraction tau of the progress its own normalised step would. By the KKT conditions
    d~ = g~_0 + sum_j mu_j g~_j, mu >= 0, and the QP is solved exactly on the normalised
    Gramian by the dual active-set method of Goldfarb and Idnani (1983) with an identity Hessian
    (:func:`priority_constrained_weights`). The update is d~ rescaled to norm(g_0):
    c = w * s * norm(g_0) / norm(d~), w = (1, mu).

    Special cases, as torchjd: g_0 = 0 gives d = 0; constraints that cannot hold together
    (e.g. two opposite secondary gradients) are dropped, d = g_0; d~ = 0 up to the Gramian's
    rounding gives d = 0. Not symmetric in the tasks (the first is the primary). The EMA
    (float64) and its step count are in the state_dict; they are not updated on skipped steps.
    Solved in float64 on the Gramian's device, without a host read (solvers.py's convention).

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`;
            the first task is the primary one.
        tau: the guaranteed fraction in [0, 1], a float or ``Tensor[K - 1]`` (0.02).
        beta: the EMA rate of the squared norms in [0, 1) (0.999).
        eps: added to the EMA before the inverse square root, >= 0 (1e-8).
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        tau: float | Tensor = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, eps=eps, **kwargs)
        taus = torch.as_tensor(tau, dtype=torch.float64)
        if taus.dim() > 1 or not bool(((taus >= 0) & (taus <= 1)).all()):
            raise ValueError(f"PCD: tau must be a float or a vector in [0, 1], got {tau}")
        k = self.num_tasks
        if taus.dim() == 1 and k is not None and taus.numel() != k - 1:
            raise ValueError(f"PCD: tau must have {k - 1} values (one per secondary task)")
        if not 0.0 <= beta < 1.0 or not eps >= 0:
            raise ValueError(f"PCD: needs beta in [0, 1) and eps >= 0, got {beta} and {eps}")
        self.beta = float(beta)
        self.register_buffer("tau", taus, persistent=False)  # (a setting: moves, not saved)
        self.register_buffer("sq_norm_ema", torch.zeros(k or 0, dtype=torch.float64))
        self.register_buffer("steps_done", torch.tensor(0))

    def _init_task_state(self) -> None:
        self.sq_norm_ema = torch.zeros(
            self.num_tasks, dtype=torch.float64, device=self.sq_norm_ema.device
        )

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        M = gramian.detach().to(torch.float64)
        k = M.shape[0]
        taus = self.tau.to(M.device)
        taus = taus.expand(k - 1) if taus.dim() == 0 else taus
        if taus.numel() != k - 1:
            raise ValueError(f"PCD: tau has {taus.numel()} values for {k - 1} secondary tasks")
        sq_norms = M.diagonal().clamp_min(0)
        self.steps_done += 1
        ema = self.beta * self.sq_norm_ema.to(M.device) + (1 - self.beta) * sq_norms
        self.sq_norm_ema.copy_(ema)
        bias = 1 - torch.pow(self.beta, self.steps_done.to(M.device, torch.float64))
        denominators = (ema / bias + self.eps).sqrt()
        # a gradient that was always zero: its scale multiplies nothing (0, not 1 / 0 at eps = 0)
        scales = torch.where(denominators > 0, 1 / denominators.clamp_min(1e-300), 0.0)
        normalised = M * scales[:, None] * scales[None, :]
        precision = 10 * torch.finfo(gramian.dtype).eps
        w = priority_constrained_weights(normalised, taus, dependence_tol=max(1e-9, precision))
        sq_norm = w @ normalised @ w
        rounding = (w.abs() @ normalised.diagonal().clamp_min(0).sqrt()) ** 2
        kept = (sq_norms[0] > 0) & (sq_norm > precision * rounding)
        weights = w * scales * (sq_norms[0] / sq_norm.clamp_min(1e-300)).sqrt()
        return torch.where(kept, weights, 0.0).to(dtype=gramian.dtype)


def priority_constrained_weights(
    gramian: Tensor, taus: Tensor, tol: float = 1e-9, dependence_tol: float = 1e-9
) -> Tensor:
    """PCD's QP, min_d 1/2 norm(d - g_0)^2 s.t. <g_j, d> >= tau_j norm(g_j)^2 (j >= 1), from the
    Gramian of g, by the dual active-set method of Goldfarb and Idnani (1983) for an identity
    Hessian.

    d = g_0 + sum_j mu_j g_j holds at every iterate, so constraint j's slack is
    (S mu - b)_j with S the secondaries' Gramian and b_j = tau_j S_jj - M_j0. Each outer step
    adds the most violated constraint p: the dual moves mu_p up by t and the active multipliers
    by -t r, r = S_AA^-1 S_Ap (the primal moves along z, g_p's component orthogonal to the
    active gradients, norm(z)^2 = S_pp - S_pA r); t is the full step -slack_p / norm(z)^2, or
    the partial step at which an active multiplier reaches 0 (that constraint is dropped and p
    tried again). Neither step finite: the constraints are infeasible.

    No host synchronisation: each iteration picks the most violated constraint if the last one
    was added (the choice is free) and takes one step; 10 K iterations run (each adds or drops
    one constraint: the budget that guards against cycling), the iterate frozen once every
    constraint holds or they are infeasible, the active set a mask (ties between ratios go to
    the lowest index); on CPU tensors the loop ends when it stops.

    Args:
        gramian: ``Tensor[K, K]`` float64, the Gramian of (g_0, ..., g_{K-1}).
        taus: ``Tensor[K - 1]`` float64, on the Gramian's device.
        tol: a slack above -tol max_i M_ii counts as satisfied.
        dependence_tol: g_p counts as dependent on the active gradients when
            norm(z)^2 <= dependence_tol S_pp.

    Returns:
        ``Tensor[K]`` float64 on the Gramian's device, (1, mu); (1, 0, ..., 0) when the
        constraints are infeasible.
    """
    k, device = gramian.shape[0], gramian.device
    one = torch.ones(1, dtype=torch.float64, device=device)
    if k == 1:
        return one
    S = gramian[1:, 1:]
    b = taus * S.diagonal() - gramian[1:, 0]
    n = k - 1
    unit = torch.eye(n, dtype=torch.bool, device=device)
    threshold = -tol * gramian.diagonal().max().clamp_min(torch.finfo(torch.float64).tiny)
    mu = torch.zeros(n, dtype=torch.float64, device=device)
    active = torch.zeros(n, dtype=torch.bool, device=device)
    # the constraint p being added, one-hot (indexing by a device scalar would be a host read)
    at_p = torch.zeros(n, dtype=torch.bool, device=device)
    slack = torch.zeros((), dtype=torch.float64, device=device)
    choosing = torch.ones((), dtype=torch.bool, device=device)  # the last step added p
    done = torch.zeros((), dtype=torch.bool, device=device)
    infeasible = torch.zeros((), dtype=torch.bool, device=device)
    shortcuts = solvers.cpu_shortcuts(gramian)
    for _ in range(10 * k):
        if shortcuts and bool(done | infeasible):
            break
        slacks = torch.where(active, 0.0, S @ mu - b)  # (active ones: equalities, up to rounding)
        least, violated = slacks.min(0, keepdim=True)
        done = done | (choosing & (least[0] >= threshold))
        at_p = torch.where(choosing, unit[violated][0], at_p)
        slack = torch.where(choosing, least[0], slack)
        S_p = at_p.to(S.dtype) @ S
        S_pp = torch.where(at_p, S_p, 0.0).sum()
        r = solvers.solve_on_support(S, S_p.unsqueeze(0), active.unsqueeze(0))[0]
        z_sq = S_pp - S_p @ r
        ratios = torch.where(active & (r > 0), mu / torch.where(r > 0, r, 1.0), torch.inf)
        partial, drop = ratios.min(0, keepdim=True)
        partial, at_drop = partial[0], unit[drop][0]
        independent = z_sq > dependence_tol * S_pp
        full = torch.where(independent, -slack / torch.where(independent, z_sq, 1.0), torch.inf)
        step = torch.minimum(partial, full)
        running = ~done & ~infeasible
        infeasible = infeasible | (running & torch.isinf(step))
        running = running & ~torch.isinf(step)
        adds = full <= partial
        moved = torch.where(at_p, mu + step, mu - step * r)
        moved = torch.where(~adds & at_drop, 0.0, moved)
        mu = torch.where(running, moved, mu)
        grown = torch.where(adds, active | at_p, active & ~at_drop)
        active = torch.where(running, grown, active)
        slack = torch.where(running & ~adds, S_p @ mu - torch.where(at_p, b, 0.0).sum(), slack)
        choosing = torch.where(running, adds, choosing)
    weights = torch.cat([one, mu.clamp_min(0.0)])
    return torch.where(infeasible, torch.cat([one, torch.zeros_like(mu)]), weights)
