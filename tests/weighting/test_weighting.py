"""fusedmtl.weighting (python/fusedmtl/weighting) against float64 evaluations of the formulas of
../shared/METHODS.md sections 3 (loss-based weightings) and 4 (gradient-based aggregation).

The oracle is built here from plain torch in float64: the model is float64, the per-task gradients
come from one torch.autograd.grad per task (``task_grads64``), and every method's weights,
coefficients, totals and updates are recomputed from the formulas (``*_oracle`` functions), not
from the library. The min-norm simplex problem of MGDA is solved by exact enumeration of the
active sets (``min_norm_simplex64``), cross-checked against its K = 2 closed form and a grid.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedmtl.weighting import (
    DBMTL,
    DWA,
    FAMO,
    MGDA,
    RLW,
    AnchorToMain,
    Fixed,
    GeneralizedMean,
    GradNorm,
    GradNormalization,
    InitialLoss,
    NashMTL,
    PCGrad,
    PriorLoss,
    RealTime,
    Uncertainty,
    initial_loss_cross_entropy,
    initial_loss_l2,
    prior_loss_classification,
    prior_loss_l1,
    prior_loss_l2,
)

K = 3
EPS = 1e-8
NORMALIZATIONS = ("none", "l2", "loss", "loss+")
GRAD_MODES = ("loop", "batched")


# --------------------------------------------------------------------------------------------
# The model: a shared trunk with three heads (two regressions of different scales, a 3-class
# classification), float64 so the float64 oracle compares tightly.


class MTLModel(nn.Module):
    def __init__(self, seed: int = 0, dtype=torch.float64, in_dim=4, hidden=8, feat=6, out_dims=(1, 1, 3)):
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, feat), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(feat, d) for d in out_dims)
        torch.random.set_rng_state(gen_state)
        self.to(dtype)

    @property
    def shared(self) -> list[torch.Tensor]:
        return list(self.trunk.parameters())

    @property
    def last_shared_layer(self) -> nn.Module:
        return self.trunk[2]

    def forward(self, x):
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def make_batch(seed: int = 0, n: int = 16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 4, generator=gen, dtype=dtype)
    y0 = torch.sin(x[:, :1] + 0.5 * x[:, 1:2]) + 0.1 * torch.randn(n, 1, generator=gen, dtype=dtype)
    y1 = 50.0 * (x[:, 2:3] - x[:, 3:4]) + torch.randn(n, 1, generator=gen, dtype=dtype)
    y2 = torch.randint(0, 3, (n,), generator=gen)
    return x, (y0, y1, y2)


def losses_from_outputs(outputs, targets):
    (o0, o1, o2), (y0, y1, y2) = outputs, targets
    return [F.mse_loss(o0, y0), F.mse_loss(o1, y1), F.cross_entropy(o2, y2)]


def model_losses(model, batch, features: bool = False):
    x, targets = batch
    z, outputs = model(x)
    losses = losses_from_outputs(outputs, targets)
    return (losses, z) if features else losses


@pytest.fixture
def model():
    return MTLModel(seed=0)


@pytest.fixture
def batch():
    return make_batch(0)


def task_grads64(losses, params) -> torch.Tensor:
    """K x N float64 matrix: row i is d L_i / d params, flattened (zeros where there is no path)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads)]))
    return torch.stack(rows)


def head_grads64(model, losses) -> list[torch.Tensor]:
    """Head i's gradient (flattened, float64) of its own loss only."""
    return [task_grads64([loss], list(head.parameters()))[0] for loss, head in zip(losses, model.heads)]


def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def _as64(x):
    return x.detach().double() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def assert_close64(actual, expected, rtol=1e-10, atol=1e-12, what=""):
    __tracebackhide__ = True
    torch.testing.assert_close(
        _as64(actual), _as64(expected), rtol=rtol, atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def leaf_losses(values, dtype=torch.float64):
    return [torch.tensor(float(v), dtype=dtype, requires_grad=True) for v in values]


# --------------------------------------------------------------------------------------------
# float64 oracles of METHODS.md


def generalized_mean64(values, gamma):
    v = [float(x) for x in values]
    k = len(v)
    if gamma == math.inf:
        return max(v)
    if gamma == -math.inf:
        return min(v)
    if gamma == 0:
        return math.exp(sum(math.log(x) for x in v) / k)
    # scaled by the max so that large gammas do not overflow (an independent evaluation)
    m = max(v)
    return m * (sum((x / m) ** gamma for x in v) / k) ** (1.0 / gamma)


def generalized_mean_weights64(values, gamma):
    """d M / d L_i of M = ((1/K) sum L^gamma)^(1/gamma): M^(1 - gamma) L_i^(gamma - 1) / K."""
    v = [float(x) for x in values]
    k, m = len(v), generalized_mean64(v, gamma)
    if math.isinf(gamma):
        target = max(v) if gamma > 0 else min(v)
        hits = [x == target for x in v]
        return torch.tensor([h / sum(hits) for h in hits], dtype=torch.float64)
    if gamma == 0:
        return torch.tensor([m / (k * x) for x in v], dtype=torch.float64)
    return torch.tensor([(x / m) ** (gamma - 1) / k for x in v], dtype=torch.float64)


def min_norm_simplex64(M: torch.Tensor) -> torch.Tensor:
    """argmin_{a in simplex} a^T M a by enumeration of the supports: on each support S the KKT
    system M_SS a_S = mu 1, sum a_S = 1; the best feasible one wins."""
    M = M.double()
    k = M.shape[0]
    best, best_value = None, math.inf
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            s = list(support)
            A = torch.zeros(r + 1, r + 1, dtype=torch.float64)
            A[:r, :r] = M[s][:, s]
            A[:r, r] = -1.0
            A[r, :r] = 1.0
            rhs = torch.zeros(r + 1, dtype=torch.float64)
            rhs[r] = 1.0
            sol = torch.linalg.lstsq(A, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            a_s = sol[:r]
            if (A @ sol - rhs).abs().max() > 1e-9 or a_s.min() < -1e-12:
                continue
            a = torch.zeros(k, dtype=torch.float64)
            a[s] = a_s.clamp_min(0)
            a = a / a.sum()
            value = float(a @ M @ a)
            if best is None or value < best_value:
                best, best_value = a, value
    return best


def mgda_oracle(G: torch.Tensor, loss_values, normalization: str) -> torch.Tensor:
    """MGDA coefficients c_i = a_i s_i from the K x N gradient matrix G (float64)."""
    norms = G.norm(dim=1)
    s = torch.ones(G.shape[0], dtype=torch.float64)
    if normalization in ("l2", "loss+"):
        s = s / (norms + EPS)
    if normalization in ("loss", "loss+"):
        s = s / (torch.as_tensor(loss_values, dtype=torch.float64).abs() + EPS)
    U = G * s[:, None]
    a = min_norm_simplex64(U @ U.T)
    return a * s


def values64(losses):
    return torch.tensor([float(loss.detach()) for loss in losses], dtype=torch.float64)


# ============================================================================================
# 1. Loss-based methods


def _weighted(weights):
    """oracle(values) for total = sum w_i L_i with fixed-from-values weights."""
    def oracle(v):
        w = weights(v)
        return float((w * v).sum()), w
    return oracle


def _gm_oracle(gamma):
    return lambda v: (generalized_mean64(v.tolist(), gamma), generalized_mean_weights64(v.tolist(), gamma))


GAMMAS = (-math.inf, -2.0, 0.0, 0.5, 1.0, 3.0, math.inf)
INITIAL = (2.0, 900.0, 1.1)
PRIORS = (0.7, 2500.0, 1.05)

LOSS_CASES = [
    pytest.param(lambda: Fixed(K), _weighted(lambda v: torch.full((K,), 1 / K, dtype=torch.float64)), id="fixed-default"),
    pytest.param(lambda: Fixed(K, weights=[0.2, 0.5, 0.3]), _weighted(lambda v: torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)), id="fixed-given"),
    pytest.param(lambda: InitialLoss(K, initial=INITIAL), _weighted(lambda v: 1 / torch.tensor(INITIAL, dtype=torch.float64)), id="initial-given"),
    pytest.param(lambda: InitialLoss(K), _weighted(lambda v: 1 / v), id="initial-first-step"),
    pytest.param(lambda: PriorLoss(K, priors=PRIORS), _weighted(lambda v: 1 / torch.tensor(PRIORS, dtype=torch.float64)), id="prior"),
    pytest.param(lambda: RealTime(K), _weighted(lambda v: 1 / v), id="real-time"),
    pytest.param(lambda: AnchorToMain(K), _weighted(lambda v: v[0] / v), id="anchor-main0"),
    pytest.param(lambda: AnchorToMain(K, main=2), _weighted(lambda v: v[2] / v), id="anchor-main2"),
    pytest.param(lambda: AnchorToMain(["a", "b", "c"], main="b"), _weighted(lambda v: v[1] / v), id="anchor-main-by-name"),
    pytest.param(lambda: DWA(K), _weighted(lambda v: torch.ones(K, dtype=torch.float64)), id="dwa-first-period"),
] + [
    pytest.param((lambda g: lambda: GeneralizedMean(K, gamma=g))(g), _gm_oracle(g), id=f"gmean-{g:g}") for g in GAMMAS
]


@pytest.mark.parametrize("make, oracle", LOSS_CASES)
def test_loss_based_total_weights_and_parameter_grads_match_float64_formula(make, oracle, model, batch):
    losses = model_losses(model, batch)
    params = list(model.parameters())
    per_task = task_grads64(losses, params)
    total64, weights64 = oracle(values64(losses))
    weighting = make()
    total = weighting(losses)
    assert total.dim() == 0
    assert_close64(total, total64, rtol=1e-7, what="total")  # eps = 1e-8 in the divisions
    assert_close64(weighting.last_weights, weights64, rtol=1e-7, what="last_weights")
    total.backward()
    scale = float((weights64.abs() @ per_task.abs()).max())
    assert_close64(flat_grad(params), weights64 @ per_task, rtol=1e-7, atol=1e-7 * scale, what="parameter grads")


@pytest.mark.parametrize("make, oracle", LOSS_CASES)
def test_loss_based_last_weights_equal_autograd_dtotal_dloss(make, oracle):
    losses = leaf_losses([0.8, 3.5, 1.7])
    weighting = make()
    total = weighting(losses)
    autograd_weights = torch.stack(torch.autograd.grad(total, losses))
    assert_close64(weighting.last_weights, autograd_weights, rtol=1e-12, what="last_weights vs dtotal/dL")


@pytest.mark.parametrize("a", [0.0, 0.3, 0.75])
def test_fixed_two_tasks_single_weight_means_a_and_one_minus_a(a):
    losses = leaf_losses([2.5, 7.0])
    weighting = Fixed(2, weights=a)
    total = weighting(losses)
    assert_close64(total, a * 2.5 + (1 - a) * 7.0, rtol=1e-15)
    grads = torch.autograd.grad(total, losses)
    assert_close64(torch.stack(grads), [a, 1 - a], rtol=1e-15)


def test_fixed_single_weight_needs_two_tasks():
    with pytest.raises(ValueError):
        Fixed(3, weights=0.5)


def test_initial_loss_uses_running_mean_of_first_n_steps_then_freezes():
    n = 3
    sequence = [[2.0, 40.0, 1.0], [1.0, 20.0, 3.0], [3.0, 30.0, 2.0], [0.5, 5.0, 0.7], [0.1, 1.0, 0.2]]
    weighting = InitialLoss(K, steps=n)
    for t, values in enumerate(sequence):
        losses = leaf_losses(values)
        total = weighting(losses)
        seen = torch.tensor(sequence[: min(t + 1, n)], dtype=torch.float64)
        expected = 1 / seen.mean(0)
        assert_close64(weighting.last_weights, expected, rtol=1e-7, what=f"step {t}")
        assert_close64(total, (expected * torch.tensor(values, dtype=torch.float64)).sum(), rtol=1e-7)


def test_initial_loss_given_values_never_change():
    weighting = InitialLoss(K, initial=INITIAL, steps=2)
    for values in ([3.0, 4.0, 5.0], [0.1, 0.2, 0.3], [9.0, 9.0, 9.0]):
        weighting(leaf_losses(values))
        assert_close64(weighting.last_weights, 1 / torch.tensor(INITIAL, dtype=torch.float64), rtol=1e-7)


def test_initial_loss_is_scale_invariant():
    sequence = [[2.0, 40.0, 1.0], [1.0, 20.0, 3.0], [0.5, 5.0, 0.7]]
    scale = torch.tensor([1.0, 1000.0, 0.01], dtype=torch.float64)
    a, b = InitialLoss(K, steps=2, eps=1e-30), InitialLoss(K, steps=2, eps=1e-30)
    for values in sequence:
        ta = a(leaf_losses(values))
        tb = b(leaf_losses((torch.tensor(values, dtype=torch.float64) * scale).tolist()))
        assert_close64(ta, tb, rtol=1e-7)


def _entropy_of_frequencies(labels):
    counts = {}
    for label in labels.flatten().tolist():
        counts[label] = counts.get(label, 0) + 1
    n = labels.numel()
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_prior_loss_classification_is_label_entropy_and_prior_cross_entropy():
    gen = torch.Generator().manual_seed(3)
    labels = torch.multinomial(torch.tensor([0.6, 0.25, 0.1, 0.05, 0.0]), 400, replacement=True, generator=gen)
    value = prior_loss_classification(labels, num_classes=5)
    assert value == pytest.approx(_entropy_of_frequencies(labels), rel=1e-12)
    # the cross-entropy of predicting the label frequencies, measured by F.cross_entropy
    freq = torch.bincount(labels, minlength=5).double() / labels.numel()
    logits = freq.clamp_min(1e-300).log().expand(labels.numel(), 5)
    assert value == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-12)
    assert prior_loss_classification(labels.reshape(20, 20)) == pytest.approx(value, rel=1e-12)
    assert prior_loss_classification(torch.full((7,), 2)) == 0.0


def test_prior_loss_l2_is_variance_the_mse_of_predicting_the_mean():
    gen = torch.Generator().manual_seed(4)
    y = 3.0 + 5.0 * torch.randn(101, 2, generator=gen)
    value = prior_loss_l2(y)
    y64 = y.double()
    expected = float(((y64 - y64.mean(0)) ** 2).mean())
    assert value == pytest.approx(expected, rel=1e-12)
    assert value == pytest.approx(float(y64.var(0, unbiased=False).mean()), rel=1e-12)
    assert prior_loss_l2(y[:, 0]) == pytest.approx(float(y64[:, 0].var(unbiased=False)), rel=1e-12)


@pytest.mark.parametrize("n", [9, 10])
def test_prior_loss_l1_is_mean_abs_deviation_from_median_and_minimal(n):
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(n, 3, generator=gen, dtype=torch.float64).exp() * 4.0  # skewed
    value = prior_loss_l1(y)
    expected = 0.0
    for column in y.T.tolist():
        s = sorted(column)
        median = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])  # any point in between is optimal
        expected += sum(abs(v - median) for v in column) / n / 3
    assert value == pytest.approx(expected, rel=1e-12)
    # no constant prediction has a smaller mean absolute error
    grid = torch.linspace(float(y.min()), float(y.max()), 2001, dtype=torch.float64)
    best = (y[None, :, :] - grid[:, None, None]).abs().mean(1).min(0).values.mean()
    assert value <= float(best) + 1e-12


def test_initial_loss_helpers_are_losses_of_the_initial_predictors():
    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 7, (50,), generator=gen)
    assert initial_loss_cross_entropy(7) == pytest.approx(float(F.cross_entropy(torch.zeros(50, 7), labels)), rel=1e-6)
    assert initial_loss_cross_entropy(7) == pytest.approx(math.log(7), rel=1e-15)
    y = 2.0 + torch.randn(40, 3, generator=gen, dtype=torch.float64)
    assert initial_loss_l2(y) == pytest.approx(float(F.mse_loss(torch.zeros_like(y), y)), rel=1e-12)


def test_generalized_mean_is_monotone_in_gamma_and_brackets_min_max():
    values = [0.3, 2.0, 7.5]
    totals = [float(GeneralizedMean(K, gamma=g)(leaf_losses(values)).detach()) for g in GAMMAS]
    assert totals[0] == pytest.approx(min(values), rel=1e-15)
    assert totals[-1] == pytest.approx(max(values), rel=1e-15)
    assert totals[GAMMAS.index(0.0)] == pytest.approx((0.3 * 2.0 * 7.5) ** (1 / 3), rel=1e-12)
    assert totals[GAMMAS.index(1.0)] == pytest.approx(sum(values) / 3, rel=1e-12)
    assert all(a < b for a, b in zip(totals, totals[1:])), totals


def test_generalized_mean_near_zero_gamma_approaches_geometric_mean():
    values = [0.3, 2.0, 7.5]
    geometric = float(GeneralizedMean(K, gamma=0.0)(leaf_losses(values)).detach())
    for g in (1e-4, -1e-4):
        assert float(GeneralizedMean(K, gamma=g)(leaf_losses(values)).detach()) == pytest.approx(geometric, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generalized_mean_large_gamma_does_not_overflow(dtype):
    values = [1000.0, 1500.0, 800.0]
    losses = leaf_losses(values, dtype)
    weighting = GeneralizedMean(K, gamma=200.0)
    total = weighting(losses)
    grads = torch.stack(torch.autograd.grad(total, losses))
    expected = generalized_mean64(values, 200.0)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert bool(total.isfinite()) and bool(grads.isfinite().all())
    assert_close64(total, expected, rtol=rtol)
    assert_close64(grads, generalized_mean_weights64(values, 200.0), rtol=rtol, atol=1e-30)
    assert_close64(weighting.last_weights, grads, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("kinds", ["regression", "classification", ["regression", "classification", "regression"]])
def test_uncertainty_total_and_log_var_gradient_match_float64_formula(kinds, model, batch):
    losses = model_losses(model, batch)
    v = values64(losses)
    per_kind = {"regression": 0.5, "classification": 1.0}
    factors = torch.tensor([per_kind[k] for k in ([kinds] * K if isinstance(kinds, str) else kinds)], dtype=torch.float64)
    weighting = Uncertainty(K, kinds=kinds, init=0.0)
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -1.2, 0.8]))
    s = weighting.log_vars.detach().double()
    params = list(model.parameters())
    per_task = task_grads64(losses, params)
    total = weighting(losses)
    assert_close64(total, (factors * torch.exp(-s) * v + 0.5 * s).sum(), rtol=1e-6)
    weighting.backward(losses)
    assert_close64(weighting.log_vars.grad, -factors * torch.exp(-s) * v + 0.5, rtol=1e-6, what="d total / d log_vars")
    assert_close64(flat_grad(params), (factors * torch.exp(-s)) @ per_task, rtol=1e-6, atol=1e-12, what="model grads")
    assert_close64(weighting.last_weights, factors * torch.exp(-s), rtol=1e-6)


def test_uncertainty_log_vars_are_parameters_starting_at_init():
    weighting = Uncertainty(K, init=0.7)
    assert [n for n, _ in weighting.named_parameters()] == ["log_vars"]
    assert weighting.log_vars.tolist() == pytest.approx([0.7] * K)


def dwa_oracle(period_means, k, temperature):
    """Weights of each period (1-based p): 1 for p <= 2, else K softmax((m_{p-1} / m_{p-2}) / T)."""
    out = []
    for p in range(len(period_means) + 1):
        if p < 2:
            out.append(torch.ones(k, dtype=torch.float64))
        else:
            rates = torch.tensor(period_means[p - 1], dtype=torch.float64) / torch.tensor(period_means[p - 2], dtype=torch.float64)
            out.append(k * torch.softmax(rates / temperature, 0))
    return out


def _dwa_sequence(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor([1.0, 30.0, 2.0], dtype=torch.float64)
    decay = torch.tensor([0.9, 0.6, 0.97], dtype=torch.float64)
    return [(base * decay**t * (1 + 0.1 * torch.rand(K, generator=gen, dtype=torch.float64))).tolist() for t in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dwa_period_steps_weights_match_float64_formula(temperature, dtype):
    period, steps = 3, 15
    sequence = _dwa_sequence(steps)
    means = [torch.tensor(sequence[i : i + period], dtype=torch.float64).mean(0).tolist() for i in range(0, steps, period)]
    expected = dwa_oracle(means, K, temperature)
    weighting = DWA(K, temperature=temperature, period_steps=period)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for t, values in enumerate(sequence):
        losses = leaf_losses(values, dtype)
        total = weighting(losses)
        w = expected[t // period]
        assert_close64(total, (w * torch.tensor(values, dtype=torch.float64)).sum(), rtol=rtol, what=f"step {t}: total")
        assert_close64(torch.stack(torch.autograd.grad(total, losses)), w, rtol=rtol, what=f"step {t}: dtotal/dL")
        assert_close64(weighting.last_weights, w, rtol=rtol, what=f"step {t}: last_weights")
    assert not torch.allclose(expected[-1], torch.ones(K, dtype=torch.float64))
    assert float(expected[-1].sum()) == pytest.approx(K)


def test_dwa_end_period_with_uneven_periods():
    lengths = [2, 4, 1, 3, 2]
    sequence = _dwa_sequence(sum(lengths), seed=1)
    weighting = DWA(K)
    means, t = [], 0
    for p, length in enumerate(lengths):
        expected = dwa_oracle(means, K, 2.0)[p]
        chunk = sequence[t : t + length]
        for values in chunk:
            weighting(leaf_losses(values))
            assert_close64(weighting.last_weights, expected, rtol=1e-12, what=f"period {p}")
        means.append(torch.tensor(chunk, dtype=torch.float64).mean(0).tolist())
        weighting.end_period()
        weighting.end_period()  # an empty period is not a period
        t += length


def test_rlw_weights_are_a_softmax_of_standard_normal_draws():
    weighting = RLW(K, seed=123)
    draws = []
    for _ in range(3000):
        losses = leaf_losses([1.0, 2.0, 3.0])
        total = weighting(losses)
        w = weighting.last_weights.double()
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((w > 0).all())
        assert_close64(total, (w * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), rtol=1e-12)
        draws.append(w.log())
    logits = torch.stack(draws)
    # softmax determines z up to a shift: the pairwise differences z_i - z_j are N(0, 2)
    diffs = torch.stack([logits[:, 0] - logits[:, 1], logits[:, 1] - logits[:, 2], logits[:, 0] - logits[:, 2]])
    assert diffs.mean(1).abs().max() < 0.1
    assert (diffs.var(1) - 2.0).abs().max() < 0.2
    assert len({tuple(d.tolist()) for d in draws[:100]}) == 100  # drawn afresh each step


def test_rlw_same_seed_same_weights_other_seed_other_weights():
    def run(seed):
        weighting = RLW(K, seed=seed)
        out = []
        for _ in range(5):
            weighting(leaf_losses([1.0, 2.0, 3.0]))
            out.append(weighting.last_weights.clone())
        return torch.stack(out)

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_real_time_gradient_is_gradient_of_sum_log_losses(model, batch):
    losses = model_losses(model, batch)
    params = list(model.parameters())
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(sum(torch.log(l) for l in losses), params, retain_graph=True)])
    RealTime(K).backward(losses)
    assert_close64(flat_grad(params), expected, rtol=1e-7, atol=1e-12)


def test_anchor_to_main_every_term_has_the_main_loss_magnitude():
    values = [0.4, 250.0, 3.0]
    losses = leaf_losses(values)
    total = AnchorToMain(K, main=0)(losses)
    assert_close64(total, 3 * 0.4, rtol=1e-7)


# ============================================================================================
# 2. Gradient-based methods


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("rescale", [False, True])
def test_grad_normalization_update_matches_float64_oracle(rescale, grad_mode, model, batch):
    losses = model_losses(model, batch)
    G = task_grads64(losses, model.shared)
    heads = head_grads64(model, losses)
    norms = G.norm(dim=1)
    coeffs64 = 1 / (norms + EPS)
    if rescale:
        coeffs64 = coeffs64 * norms.mean()
    weighting = GradNormalization(model.shared, K, rescale=rescale, grad_mode=grad_mode)
    coeffs = weighting.backward(losses)
    assert_close64(coeffs, coeffs64, rtol=1e-10, what="coefficients")
    assert_close64(weighting.last_weights, coeffs64, rtol=1e-10, what="last_weights")
    assert_close64(weighting.last_grad_norms, norms, rtol=1e-10, what="last_grad_norms")
    assert_close64(flat_grad(model.shared), coeffs64 @ G, rtol=1e-10, atol=1e-13, what="shared .grad")
    for i, head in enumerate(model.heads):
        assert_close64(flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i} .grad")


def _transformed(losses, scales, shifts):
    return [a * loss + b for loss, a, b in zip(losses, scales, shifts)]


@pytest.mark.parametrize("scales, shifts", [((7.0, 1.0, 0.01), (0.0, 0.0, 0.0)), ((1.0, 1.0, 1.0), (5.0, -3.0, 100.0)), ((0.2, 30.0, 1.0), (1.0, 2.0, -0.5))])
def test_grad_normalization_shared_update_invariant_to_loss_scale_and_shift(scales, shifts, batch):
    reference, transformed = MTLModel(seed=1), MTLModel(seed=1)
    # eps (1e-8 by default) is the only thing that breaks the invariance: make it negligible
    GradNormalization(reference.shared, K, eps=1e-30).backward(model_losses(reference, batch))
    GradNormalization(transformed.shared, K, eps=1e-30).backward(_transformed(model_losses(transformed, batch), scales, shifts))
    expected = flat_grad(reference.shared)
    assert_close64(flat_grad(transformed.shared), expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def gradnorm_oracle_step(weights, initial, layer_norms, loss_values, alpha, lr, k):
    """(weights used for d, weights after the SGD step and renormalisation, initial losses)."""
    if initial is None:
        initial = loss_values.clone()
    G = weights * layer_norms
    r = loss_values / initial
    r = r / r.mean()
    target = G.mean() * r**alpha
    grad = torch.sign(G - target) * layer_norms
    new = (weights - lr * grad).clamp_min(EPS)
    return weights, new * k / new.sum(), initial


@pytest.mark.parametrize("alpha", [0.5, 1.5])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_gradnorm_weights_and_update_match_float64_reimplementation(alpha, grad_mode):
    lr, steps = 0.002, 6
    model = MTLModel(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    layer = list(model.last_shared_layer.parameters())
    weighting = GradNorm(
        model.shared, K, last_shared_layer=model.last_shared_layer, alpha=alpha,
        weight_optimizer=lambda p: torch.optim.SGD(p, lr=lr), grad_mode=grad_mode,
    )
    weights64, initial64 = torch.ones(K, dtype=torch.float64), None
    changed = False
    for t in range(steps):
        losses = model_losses(model, make_batch(t))
        G = task_grads64(losses, model.shared)
        layer_norms = task_grads64(losses, layer).norm(dim=1)
        used, weights64, initial64 = gradnorm_oracle_step(weights64, initial64, layer_norms, values64(losses), alpha, lr, K)
        coeffs = weighting.backward(losses)
        assert_close64(coeffs, used, rtol=1e-5, what=f"step {t}: coefficients")
        assert_close64(flat_grad(model.shared), used @ G, rtol=1e-5, atol=1e-9, what=f"step {t}: shared .grad")
        assert_close64(weighting.task_weights, weights64, rtol=1e-5, what=f"step {t}: weights after update")
        assert float(weighting.task_weights.double().sum()) == pytest.approx(K, rel=1e-6)
        assert_close64(weighting.initial_losses, initial64, rtol=1e-6, what="initial losses (first step)")
        assert_close64(weighting.last_grad_norms, layer_norms, rtol=1e-6, what="last_grad_norms (of W)")
        changed |= not torch.allclose(weights64, torch.ones(K, dtype=torch.float64))
        optimizer.step()
        optimizer.zero_grad()
    assert changed


def test_gradnorm_closed_form_weight_gradient_equals_autograd_of_l_grad(model, batch):
    """dL_grad/dw_i = sign(G_i - target_i) norm(grad_W L_i), with L_grad differentiated by autograd
    (targets detached), as the SGD step of the weights reveals."""
    lr = 1e-3
    losses = model_losses(model, batch)
    layer = list(model.last_shared_layer.parameters())
    norms = task_grads64(losses, layer).norm(dim=1)
    w = torch.tensor([0.5, 1.7, 0.8], dtype=torch.float64, requires_grad=True)
    G = w * norms
    # first step: r = 1; target = mean G
    l_grad = (G - G.mean().detach()).abs().sum()
    (grad,) = torch.autograd.grad(l_grad, w)
    weighting = GradNorm(model.shared, K, last_shared_layer=layer, weight_optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    with torch.no_grad():
        weighting.task_weights.copy_(w.detach())
    weighting.backward(losses)
    new = w.detach() - lr * grad
    assert_close64(weighting.task_weights, new * K / new.sum(), rtol=1e-5)


def test_gradnorm_last_shared_layer_must_be_shared(model):
    with pytest.raises(ValueError):
        GradNorm(model.shared, K, last_shared_layer=model.heads[0])


# -- MGDA -------------------------------------------------------------------------------------


def _random_gramian(k, n, seed, scales=None):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=torch.float64)
    if scales is not None:
        g = g * torch.tensor(scales, dtype=torch.float64)[:, None]
    return g @ g.T, g


def test_min_norm_oracle_agrees_with_k2_closed_form():
    for seed in range(20):
        M, _ = _random_gramian(2, 3, seed, scales=(1.0, 0.1 + seed / 5))
        a1 = min(max((M[1, 1] - M[0, 1]) / (M[0, 0] + M[1, 1] - 2 * M[0, 1]), 0.0), 1.0)
        assert_close64(min_norm_simplex64(M), [a1, 1 - a1], rtol=0, atol=1e-12)


SPECIAL_GRADIENTS = {
    "opposite": [[1.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    "vertex": [[0.05, 0.05, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]],  # the small one is the answer
    "edge": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 3.0, 0.0]],
    "orthogonal": [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]],
    "aligned": [[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [3.0, 3.0, 0.0]],
}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("case", ["random0", "random1", "random2", "scaled"] + list(SPECIAL_GRADIENTS))
def test_mgda_coefficients_are_the_min_norm_point(case, k):
    if case in SPECIAL_GRADIENTS:
        g = torch.tensor(SPECIAL_GRADIENTS[case], dtype=torch.float64)[:k]
        M = g @ g.T
    else:
        M, g = _random_gramian(k, 5, seed=int(case[-1]) if case != "scaled" else 9, scales=(1.0, 1e-3, 30.0)[:k] if case == "scaled" else None)
    dummy = torch.zeros(1, requires_grad=True)
    a = MGDA([dummy], k, normalization="none").coefficients(M.clone(), torch.ones(k, dtype=torch.float64)).double()
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-9) and float(a.min()) >= -1e-12
    expected = min_norm_simplex64(M)
    value, best = float(a @ M @ a), float(expected @ M @ expected)
    assert value <= best + 1e-10 * float(M.diagonal().max())
    if k == 2:
        a1 = min(max(float((M[1, 1] - M[0, 1]) / (M[0, 0] + M[1, 1] - 2 * M[0, 1])), 0.0), 1.0)
        assert_close64(a, [a1, 1 - a1], rtol=0, atol=1e-8, what="K=2 closed form")
    else:
        # a brute-force grid over the simplex finds nothing smaller
        n = 150
        grid = torch.tensor([(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)], dtype=torch.float64)
        assert value <= float(((grid @ M) * grid).sum(1).min()) + 1e-12
        if torch.linalg.matrix_rank(M) == k:  # strictly convex: the minimiser is unique
            assert_close64(a, expected, rtol=0, atol=1e-7, what="minimiser")


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mgda_coefficients_and_update_match_float64_oracle(normalization, grad_mode, model, batch):
    losses = model_losses(model, batch)
    G = task_grads64(losses, model.shared)
    heads = head_grads64(model, losses)
    coeffs64 = mgda_oracle(G, values64(losses), normalization)
    weighting = MGDA(model.shared, K, normalization=normalization, grad_mode=grad_mode)
    coeffs = weighting.backward(losses)
    scale = float(coeffs64.abs().max())
    assert_close64(coeffs, coeffs64, rtol=1e-6, atol=1e-9 * scale, what="coefficients")
    d = coeffs64 @ G
    assert_close64(flat_grad(model.shared), d, rtol=1e-6, atol=1e-9 * float(d.abs().max()), what="shared .grad")
    for i, head in enumerate(model.heads):
        assert_close64(flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i}")
    norms = G.norm(dim=1)
    assert_close64(weighting.last_grad_norms, norms, rtol=1e-10)
    assert_close64(weighting.last_cosine, (G @ G.T) / (norms[:, None] * norms[None, :]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_direction_decreases_no_task_loss(normalization, seed):
    """<d, g_i> >= 0 for every task: d is the min-norm point of the hull of u_i = s_i g_i, so
    <d, u_i> >= |d|^2."""
    model = MTLModel(seed=10 + seed)
    losses = model_losses(model, make_batch(seed))
    G = task_grads64(losses, model.shared)
    MGDA(model.shared, K, normalization=normalization).backward(losses)
    d = flat_grad(model.shared)
    dots = G @ d
    tol = 1e-8 * float(d.norm() * G.norm(dim=1).max())
    assert bool((dots >= -tol).all()), dots


def test_mgda_l2_update_invariant_to_loss_scale(batch):
    reference, scaled = MTLModel(seed=3), MTLModel(seed=3)
    MGDA(reference.shared, K, normalization="l2", eps=1e-30).backward(model_losses(reference, batch))
    MGDA(scaled.shared, K, normalization="l2", eps=1e-30).backward(_transformed(model_losses(scaled, batch), (100.0, 0.01, 3.0), (0.0, 0.0, 0.0)))
    expected = flat_grad(reference.shared)
    assert_close64(flat_grad(scaled.shared), expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mgda_representation_mode_equals_feature_gradients_and_one_trunk_backward(normalization, model, batch):
    losses, z = model_losses(model, batch, features=True)
    Z = task_grads64(losses, [z])
    heads = head_grads64(model, losses)
    coeffs64 = mgda_oracle(Z, values64(losses), normalization)
    dz = (coeffs64 @ Z).reshape(z.shape)
    trunk64 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, model.shared, dz, retain_graph=True)])
    coeffs = MGDA(model.shared, K, normalization=normalization).backward(losses, features=z)
    assert_close64(coeffs, coeffs64, rtol=1e-6, atol=1e-9 * float(coeffs64.abs().max()), what="coefficients")
    assert_close64(flat_grad(model.shared), trunk64, rtol=1e-6, atol=1e-9 * float(trunk64.abs().max()), what="shared .grad")
    for i, head in enumerate(model.heads):
        assert_close64(flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i}")


def test_grad_normalization_representation_mode_matches_oracle(model, batch):
    losses, z = model_losses(model, batch, features=True)
    Z = task_grads64(losses, [z])
    coeffs64 = 1 / (Z.norm(dim=1) + EPS)
    dz = (coeffs64 @ Z).reshape(z.shape)
    trunk64 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, model.shared, dz, retain_graph=True)])
    GradNormalization(model.shared, K).backward(losses, features=z)
    assert_close64(flat_grad(model.shared), trunk64, rtol=1e-9, atol=1e-13)


# ============================================================================================
# 3. Framework behaviour


def _grad_norm_factory(shared, tasks, model=None, **kw):
    return GradNormalization(shared, tasks, **kw)


def _gradnorm_factory(shared, tasks, model=None, **kw):
    return GradNorm(shared, tasks, last_shared_layer=model.last_shared_layer, **kw)


def _mgda_factory(shared, tasks, model=None, **kw):
    return MGDA(shared, tasks, **kw)


GRADIENT_METHODS = [
    pytest.param(_grad_norm_factory, id="gradnormalization"),
    pytest.param(_gradnorm_factory, id="gradnorm"),
    pytest.param(_mgda_factory, id="mgda"),
]


def _fresh_grads_and_coeffs(make, seed, batch, **kw):
    m = MTLModel(seed=seed)
    coeffs = make(m.shared, K, model=m, **kw).backward(model_losses(m, batch))
    return [p.grad.clone() for p in m.parameters()], coeffs


@pytest.mark.parametrize("make", GRADIENT_METHODS)
def test_gradient_method_accumulates_into_existing_grad_and_creates_missing(make, batch):
    single, _ = _fresh_grads_and_coeffs(make, 4, batch)
    model = MTLModel(seed=4)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(9)
    existing = {}
    for i, p in enumerate(params):
        if i % 2 == 0:  # every other parameter has a .grad already, the rest None
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            existing[i] = p.grad.clone()
    make(model.shared, K, model=model).backward(model_losses(model, batch))
    for i, (p, g) in enumerate(zip(params, single)):
        assert p.grad is not None
        expected = existing[i] + g if i in existing else g
        assert_close64(p.grad, expected, rtol=1e-12, atol=1e-14, what=f"param {i}")


@pytest.mark.parametrize("make", [GRADIENT_METHODS[0], GRADIENT_METHODS[2]])
def test_second_backward_adds_like_autograd(make, batch):
    single, _ = _fresh_grads_and_coeffs(make, 5, batch)
    model = MTLModel(seed=5)
    weighting = make(model.shared, K, model=model)
    weighting.backward(model_losses(model, batch))
    weighting.backward(model_losses(model, batch))
    for i, (p, g) in enumerate(zip(model.parameters(), single)):
        assert_close64(p.grad, 2 * g, rtol=1e-12, atol=1e-14, what=f"param {i}")


def test_loss_based_backward_accumulates_like_autograd(batch):
    reference, model = MTLModel(seed=6), MTLModel(seed=6)
    (RealTime(K)(model_losses(reference, batch)) * 2).backward()
    weighting = RealTime(K)
    weighting.backward(model_losses(model, batch))
    weighting.backward(model_losses(model, batch))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close64(p.grad, q.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("make", GRADIENT_METHODS)
def test_heads_get_only_their_own_loss_gradient(make, model, batch):
    losses = model_losses(model, batch)
    heads = head_grads64(model, losses)
    make(model.shared, K, model=model).backward(losses)
    for i, head in enumerate(model.heads):
        assert_close64(flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i}")


@pytest.mark.parametrize("make", GRADIENT_METHODS)
def test_loop_and_batched_grad_modes_agree(make, batch):
    loop, c_loop = _fresh_grads_and_coeffs(make, 7, batch, grad_mode="loop")
    batched, c_batched = _fresh_grads_and_coeffs(make, 7, batch, grad_mode="batched")
    assert_close64(c_batched, c_loop, rtol=1e-9, atol=1e-12)
    for i, (a, b) in enumerate(zip(batched, loop)):
        assert_close64(a, b, rtol=1e-9, atol=1e-13, what=f"param {i}")


def test_invalid_grad_mode_raises(model, batch):
    with pytest.raises(ValueError):
        GradNormalization(model.shared, K, grad_mode="vmap").backward(model_losses(model, batch))


@pytest.mark.parametrize("make", GRADIENT_METHODS)
def test_dict_losses_in_any_order_equal_list_in_task_order(make, batch):
    names = ["reg", "big", "cls"]
    listed, c_listed = _fresh_grads_and_coeffs(make, 8, batch)
    model = MTLModel(seed=8)
    weighting = make(model.shared, names, model=model, track_conflict=True)
    l0, l1, l2 = model_losses(model, batch)
    coeffs = weighting.backward({"cls": l2, "reg": l0, "big": l1})
    assert_close64(coeffs, c_listed, rtol=1e-12)
    for a, b in zip(model.parameters(), listed):
        assert_close64(a.grad, b, rtol=1e-12, atol=1e-15)
    log = weighting.log()
    expected_keys = {f"weight/{n}" for n in names} | {f"grad_norm/{n}" for n in names} | {"cosine/reg,big", "cosine/reg,cls", "cosine/big,cls"}
    assert set(log) == expected_keys
    assert [log[f"weight/{n}"] for n in names] == pytest.approx(weighting.last_weights.tolist(), rel=1e-12)
    assert [log[f"grad_norm/{n}"] for n in names] == pytest.approx(weighting.last_grad_norms.tolist(), rel=1e-12)
    assert log["cosine/reg,cls"] == pytest.approx(float(weighting.last_cosine[0, 2]), rel=1e-12)


def test_loss_based_dict_losses_and_log_keys():
    weighting = Fixed(["a", "b", "c"], weights=[0.1, 0.2, 0.7])
    assert weighting.log() == {}
    total = weighting({"c": torch.tensor(1.0), "a": torch.tensor(10.0), "b": torch.tensor(100.0)})
    assert float(total) == pytest.approx(0.1 * 10 + 0.2 * 100 + 0.7 * 1, rel=1e-6)
    assert weighting.log() == pytest.approx({"weight/a": 0.1, "weight/b": 0.2, "weight/c": 0.7})


def test_unnamed_tasks_take_their_names_from_the_first_dict():
    weighting = RealTime(2)
    weighting({"depth": torch.tensor(2.0), "seg": torch.tensor(4.0)})
    assert set(weighting.log()) == {"weight/depth", "weight/seg"}
    assert weighting.log()["weight/seg"] == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("track_conflict", [False, True])
def test_last_cosine_matches_float64_oracle(track_conflict, model, batch):
    losses = model_losses(model, batch)
    G = task_grads64(losses, model.shared)
    weighting = GradNormalization(model.shared, K, track_conflict=track_conflict)
    assert weighting.last_weights is None and weighting.last_grad_norms is None and weighting.last_cosine is None
    weighting.backward(losses)
    if not track_conflict:
        assert weighting.last_cosine is None
        return
    norms = G.norm(dim=1)
    cosine = (G @ G.T) / (norms[:, None] * norms[None, :])
    assert_close64(weighting.last_cosine, cosine, rtol=1e-9, atol=1e-12)
    assert bool((cosine - torch.eye(K, dtype=torch.float64)).abs().max() > 1e-3)  # not a trivial matrix


# -- errors -----------------------------------------------------------------------------------


def _method(kind, model):
    if kind == "loss":
        return Fixed(["a", "b", "c"])
    return GradNormalization(model.shared, ["a", "b", "c"])


def _call(kind, weighting, losses):
    return weighting.backward(losses) if kind == "gradient" else weighting(losses)


BAD_INPUTS = {
    "too-few": lambda ls: ls[:2],
    "too-many": lambda ls: ls + [ls[0] * 2],
    "non-scalar": lambda ls: [ls[0], ls[1], torch.stack([ls[2], ls[2]])],
    "integer": lambda ls: [ls[0], ls[1], torch.tensor(3)],
    "other-device": lambda ls: [ls[0], ls[1], torch.tensor(1.0, dtype=torch.float64, device="meta")],
    "wrong-dict-keys": lambda ls: {"a": ls[0], "b": ls[1], "x": ls[2]},
    "missing-dict-key": lambda ls: {"a": ls[0], "b": ls[1]},
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_malformed_losses_raise(kind, bad, model, batch):
    weighting = _method(kind, model)
    with pytest.raises((ValueError, TypeError)):
        _call(kind, weighting, BAD_INPUTS[bad](model_losses(model, batch)))
    assert all(p.grad is None for p in model.parameters())


def test_no_shared_params_raises():
    with pytest.raises(ValueError):
        GradNormalization([], K)


def test_unknown_nonfinite_policy_raises():
    with pytest.raises(ValueError):
        Fixed(K, on_nonfinite="warn")


# -- non-finite losses ------------------------------------------------------------------------

STATEFUL_LOSS_METHODS = [
    pytest.param(lambda **kw: InitialLoss(K, steps=3, **kw), id="initial"),
    pytest.param(lambda **kw: DWA(K, period_steps=1, **kw), id="dwa"),
    pytest.param(lambda **kw: RLW(K, seed=1, **kw), id="rlw"),
    pytest.param(lambda **kw: Uncertainty(K, **kw), id="uncertainty"),
    pytest.param(lambda **kw: RealTime(K, **kw), id="realtime"),
]


def _nan_losses(model, batch, value=float("nan")):
    l0, l1, l2 = model_losses(model, batch)
    return [l0, l1 * value, l2]


def _snapshot(module):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("make", STATEFUL_LOSS_METHODS)
def test_loss_based_nonfinite_raise_skip_ignore(make, value, model, batch):
    with pytest.raises(ValueError):
        make()(_nan_losses(model, batch, value))
    weighting = make(on_nonfinite="skip")
    weighting.backward(model_losses(model, batch))  # one good step, then a bad one
    grads = [p.grad.clone() for p in list(model.parameters()) + list(weighting.parameters())]
    weights = weighting.last_weights.clone()
    state = _snapshot(weighting)
    nxt = copy.deepcopy(weighting)
    with pytest.warns(UserWarning, match="non-finite"):
        assert weighting.backward(_nan_losses(model, batch, value)) is None
    for p, g in zip(list(model.parameters()) + list(weighting.parameters()), grads):
        assert torch.equal(p.grad, g)
    assert _snapshot(weighting) == state
    assert torch.equal(weighting.last_weights, weights)
    # the next good step is the one that would have come without the skipped one
    losses = model_losses(model, batch)
    weighting(losses)
    nxt(losses)
    assert torch.equal(weighting.last_weights, nxt.last_weights)
    ignoring = make(on_nonfinite="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = ignoring(_nan_losses(model, batch, value))
    assert not bool(total.isfinite())


@pytest.mark.parametrize("make", GRADIENT_METHODS)
def test_gradient_based_nonfinite_raise_skip_ignore(make, batch):
    model = MTLModel(seed=11)
    with pytest.raises(ValueError):
        make(model.shared, K, model=model).backward(_nan_losses(model, batch))
    weighting = make(model.shared, K, model=model, on_nonfinite="skip")
    coeffs = weighting.backward(model_losses(model, batch))
    grads = [p.grad.clone() for p in model.parameters()]
    state = _snapshot(weighting)
    with pytest.warns(UserWarning, match="non-finite"):
        assert weighting.backward(_nan_losses(model, batch)) is None
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert _snapshot(weighting) == state
    assert torch.equal(weighting.last_weights, coeffs)
    model.zero_grad(set_to_none=True)
    ignoring = make(model.shared, K, model=model, on_nonfinite="ignore")
    ignoring.backward(_nan_losses(model, batch))  # no check, no exception


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mgda_zero_gradient_task_gives_finite_coefficients(normalization, model, batch):
    l0, l1, l2 = model_losses(model, batch)
    losses = [0.0 * l0, l1, l2]
    coeffs = MGDA(model.shared, K, normalization=normalization).backward(losses)
    assert bool(coeffs.isfinite().all())
    for p in model.parameters():
        assert bool(p.grad.isfinite().all())
    # the zero vector is in the hull: the min-norm update is zero (to rounding)
    assert float(flat_grad(model.shared).abs().max()) <= 1e-12


@pytest.mark.parametrize("make", GRADIENT_METHODS)
def test_zero_gradient_task_gives_finite_coefficients_and_grads(make, model, batch):
    l0, l1, l2 = model_losses(model, batch)
    losses = [0.0 * l0, l1, l2]
    G = task_grads64(losses, model.shared)
    assert float(G[0].abs().max()) == 0.0
    weighting = make(model.shared, K, model=model)
    coeffs = weighting.backward(losses)
    assert bool(coeffs.isfinite().all())
    assert float(weighting.last_grad_norms[0]) == 0.0
    for p in model.parameters():
        assert bool(p.grad.isfinite().all())
    if make is _grad_norm_factory:
        norms = G.norm(dim=1)
        assert_close64(flat_grad(model.shared), G[1] / (norms[1] + EPS) + G[2] / (norms[2] + EPS), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("make", GRADIENT_METHODS)
def test_task_without_path_to_shared_params_warns_and_counts_as_zero(make, grad_mode, model, batch):
    _, l1, l2 = model_losses(model, batch)
    l0 = (model.heads[0].weight ** 2).sum() + model.heads[0].bias.sum()  # reaches head 0 only
    losses = [l0, l1, l2]
    G = task_grads64(losses, model.shared)
    head0 = task_grads64([l0], list(model.heads[0].parameters()))[0]
    weighting = make(model.shared, K, model=model, grad_mode=grad_mode)
    with pytest.warns(UserWarning, match="no path"):
        coeffs = weighting.backward(losses)
    assert bool(coeffs.isfinite().all())
    assert float(weighting.last_grad_norms[0]) == 0.0
    for p in model.parameters():
        assert bool(p.grad.isfinite().all())
    assert_close64(flat_grad(model.heads[0].parameters()), head0, rtol=1e-12)
    if make is _grad_norm_factory:
        norms = G.norm(dim=1)
        assert_close64(flat_grad(model.shared), G[1] / (norms[1] + EPS) + G[2] / (norms[2] + EPS), rtol=1e-9, atol=1e-13)


# ============================================================================================
# 4. state_dict round trips


class LossRun:
    """A stateful loss-based weighting fed a fixed sequence of losses."""

    def __init__(self, make, trains=False):
        self.make, self.trains = make, trains

    def build(self):
        weighting = self.make()
        ctx = {"opt": torch.optim.SGD(weighting.parameters(), lr=0.1)} if self.trains else {}
        return weighting, ctx

    def step(self, weighting, ctx, t):
        values = _dwa_sequence(40, seed=3)[t]
        if self.trains:
            ctx["opt"].zero_grad()
        weighting.backward(leaf_losses(values))
        if self.trains:
            ctx["opt"].step()
        return weighting.last_weights.clone()

    def save(self, weighting, ctx):
        return {"weighting": weighting.state_dict()}

    def load(self, state):
        weighting, ctx = self.build()
        weighting.load_state_dict(state["weighting"])
        return weighting, ctx


class GradientRun:
    """A gradient-based method (made by ``factory(model)``) training a model with SGD; the
    default is GradNorm with its Adam weight optimizer."""

    def __init__(self, factory=None):
        self.factory = factory or (
            lambda model: GradNorm(model.shared, K, last_shared_layer=model.last_shared_layer, alpha=1.0)
        )

    def build(self, seed=12):
        model = MTLModel(seed=seed)
        return self.factory(model), {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.02)}

    def step(self, weighting, ctx, t):
        coeffs = weighting.backward(model_losses(ctx["model"], make_batch(t)))
        ctx["opt"].step()
        ctx["opt"].zero_grad()
        return coeffs.clone()

    def save(self, weighting, ctx):
        return {"weighting": weighting.state_dict(), "model": ctx["model"].state_dict()}

    def load(self, state):
        weighting, ctx = self.build(seed=99)
        ctx["model"].load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        return weighting, ctx


ROUND_TRIPS = [
    pytest.param(LossRun(lambda: InitialLoss(K, steps=5)), id="initial-loss-mid-warmup"),
    pytest.param(LossRun(lambda: DWA(K, period_steps=2)), id="dwa"),
    pytest.param(LossRun(lambda: RLW(K, seed=5)), id="rlw"),
    pytest.param(LossRun(lambda: Uncertainty(K, kinds=["regression", "regression", "classification"]), trains=True), id="uncertainty"),
    pytest.param(GradientRun(), id="gradnorm-adam"),
    pytest.param(LossRun(lambda: FAMO(K)), id="famo-adam"),
    pytest.param(GradientRun(lambda model: PCGrad(model.shared, K, seed=3)), id="pcgrad-generator"),
    pytest.param(GradientRun(lambda model: NashMTL(model.shared, K, update_every=4)), id="nash-mtl-reused-solution"),
    pytest.param(GradientRun(lambda model: DBMTL(model.shared, K)), id="db-mtl-running-averages"),
]


@pytest.mark.parametrize("run", ROUND_TRIPS)
def test_state_dict_round_trip_resumes_bit_for_bit(run):
    before, after = 3, 6
    weighting, ctx = run.build()
    for t in range(before):
        run.step(weighting, ctx, t)
    buf = io.BytesIO()
    torch.save(run.save(weighting, ctx), buf)
    continued = [run.step(weighting, ctx, t) for t in range(before, before + after)]
    buf.seek(0)
    resumed, resumed_ctx = run.load(torch.load(buf, weights_only=False))
    replayed = [run.step(resumed, resumed_ctx, t) for t in range(before, before + after)]
    for t, (a, b) in enumerate(zip(continued, replayed)):
        assert torch.equal(a, b), f"step {before + t}: {a.tolist()} != {b.tolist()}"
    # the check has teeth: a fresh module without the state gives other weights
    fresh, fresh_ctx = run.build()
    if isinstance(run, GradientRun):
        fresh_ctx["model"].load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False)["model"])
    unrestored = [run.step(fresh, fresh_ctx, t) for t in range(before, before + after)]
    assert any(not torch.equal(a, b) for a, b in zip(continued, unrestored))
