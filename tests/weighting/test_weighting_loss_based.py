"""The loss-based weightings (fusedmtl/weighting/methods/, docs/METHODS.md section 3) against
float64 evaluations of their formulas: totals, weights (d total / d L_i, checked against autograd
too), the parameters' gradients, and each method's own behaviour (warm-up, periods, draws,
learned log-variances, FAMO's logit update).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from weighting_cases import (
    K,
    assert_close64,
    flat_grad,
    leaf_losses,
    loss_sequence,
    model_losses,
    task_grads64,
    values64,
)

from fusedmtl import weighting
from fusedmtl.weighting import (
    DWA,
    RLW,
    AnchorToMain,
    Fixed,
    GeneralizedMean,
    InitialLoss,
    PriorLoss,
    RealTime,
    Uncertainty,
    initial_loss_cross_entropy,
    initial_loss_l2,
    prior_loss_classification,
    prior_loss_l1,
    prior_loss_l2,
)

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


# ============================================================================================
# 1. Loss-based methods


def _weighted(weights):
    """oracle(values) for total = sum w_i L_i with fixed-from-values weights."""

    def oracle(v):
        w = weights(v)
        return float((w * v).sum()), w

    return oracle


def _gm_oracle(gamma):
    return lambda v: (
        generalized_mean64(v.tolist(), gamma),
        generalized_mean_weights64(v.tolist(), gamma),
    )


GAMMAS = (-math.inf, -2.0, 0.0, 0.5, 1.0, 3.0, math.inf)
INITIAL = (2.0, 900.0, 1.1)
PRIORS = (0.7, 2500.0, 1.05)

LOSS_CASES = [
    pytest.param(
        lambda: Fixed(K),
        _weighted(lambda v: torch.full((K,), 1 / K, dtype=torch.float64)),
        id="fixed-default",
    ),
    pytest.param(
        lambda: Fixed(K, weights=[0.2, 0.5, 0.3]),
        _weighted(lambda v: torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)),
        id="fixed-given",
    ),
    pytest.param(
        lambda: InitialLoss(K, initial=INITIAL),
        _weighted(lambda v: 1 / torch.tensor(INITIAL, dtype=torch.float64)),
        id="initial-given",
    ),
    pytest.param(lambda: InitialLoss(K), _weighted(lambda v: 1 / v), id="initial-first-step"),
    pytest.param(
        lambda: PriorLoss(K, priors=PRIORS),
        _weighted(lambda v: 1 / torch.tensor(PRIORS, dtype=torch.float64)),
        id="prior",
    ),
    pytest.param(lambda: RealTime(K), _weighted(lambda v: 1 / v), id="real-time"),
    pytest.param(lambda: AnchorToMain(K), _weighted(lambda v: v[0] / v), id="anchor-main0"),
    pytest.param(lambda: AnchorToMain(K, main=2), _weighted(lambda v: v[2] / v), id="anchor-main2"),
    pytest.param(
        lambda: AnchorToMain(["a", "b", "c"], main="b"),
        _weighted(lambda v: v[1] / v),
        id="anchor-main-by-name",
    ),
    pytest.param(
        lambda: DWA(K),
        _weighted(lambda v: torch.ones(K, dtype=torch.float64)),
        id="dwa-first-period",
    ),
] + [
    pytest.param(
        (lambda g: lambda: GeneralizedMean(K, gamma=g))(g), _gm_oracle(g), id=f"gmean-{g:g}"
    )
    for g in GAMMAS
]


@pytest.mark.parametrize("make, oracle", LOSS_CASES)
def test_loss_based_total_weights_and_parameter_grads_match_float64_formula(
    make, oracle, model, batch
):
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
    assert_close64(
        flat_grad(params),
        weights64 @ per_task,
        rtol=1e-7,
        atol=1e-7 * scale,
        what="parameter grads",
    )


@pytest.mark.parametrize("make, oracle", LOSS_CASES)
def test_loss_based_last_weights_equal_autograd_dtotal_dloss(make, oracle):
    losses = leaf_losses([0.8, 3.5, 1.7])
    weighting = make()
    total = weighting(losses)
    autograd_weights = torch.stack(torch.autograd.grad(total, losses))
    assert_close64(
        weighting.last_weights, autograd_weights, rtol=1e-12, what="last_weights vs dtotal/dL"
    )


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
    sequence = [
        [2.0, 40.0, 1.0],
        [1.0, 20.0, 3.0],
        [3.0, 30.0, 2.0],
        [0.5, 5.0, 0.7],
        [0.1, 1.0, 0.2],
    ]
    weighting = InitialLoss(K, steps=n)
    for t, values in enumerate(sequence):
        losses = leaf_losses(values)
        total = weighting(losses)
        seen = torch.tensor(sequence[: min(t + 1, n)], dtype=torch.float64)
        expected = 1 / seen.mean(0)
        assert_close64(weighting.last_weights, expected, rtol=1e-7, what=f"step {t}")
        assert_close64(
            total, (expected * torch.tensor(values, dtype=torch.float64)).sum(), rtol=1e-7
        )


def test_initial_loss_given_values_never_change():
    weighting = InitialLoss(K, initial=INITIAL, steps=2)
    for values in ([3.0, 4.0, 5.0], [0.1, 0.2, 0.3], [9.0, 9.0, 9.0]):
        weighting(leaf_losses(values))
        assert_close64(
            weighting.last_weights, 1 / torch.tensor(INITIAL, dtype=torch.float64), rtol=1e-7
        )


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
    labels = torch.multinomial(
        torch.tensor([0.6, 0.25, 0.1, 0.05, 0.0]), 400, replacement=True, generator=gen
    )
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
        median = (
            s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        )  # any point in between is optimal
        expected += sum(abs(v - median) for v in column) / n / 3
    assert value == pytest.approx(expected, rel=1e-12)
    # no constant prediction has a smaller mean absolute error
    grid = torch.linspace(float(y.min()), float(y.max()), 2001, dtype=torch.float64)
    best = (y[None, :, :] - grid[:, None, None]).abs().mean(1).min(0).values.mean()
    assert value <= float(best) + 1e-12


def test_initial_loss_helpers_are_losses_of_the_initial_predictors():
    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 7, (50,), generator=gen)
    assert initial_loss_cross_entropy(7) == pytest.approx(
        float(F.cross_entropy(torch.zeros(50, 7), labels)), rel=1e-6
    )
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
        assert float(GeneralizedMean(K, gamma=g)(leaf_losses(values)).detach()) == pytest.approx(
            geometric, rel=1e-3
        )


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


@pytest.mark.parametrize(
    "kinds", ["regression", "classification", ["regression", "classification", "regression"]]
)
def test_uncertainty_total_and_log_var_gradient_match_float64_formula(kinds, model, batch):
    losses = model_losses(model, batch)
    v = values64(losses)
    per_kind = {"regression": 0.5, "classification": 1.0}
    factors = torch.tensor(
        [per_kind[k] for k in ([kinds] * K if isinstance(kinds, str) else kinds)],
        dtype=torch.float64,
    )
    weighting = Uncertainty(K, kinds=kinds, init=0.0)
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -1.2, 0.8]))
    s = weighting.log_vars.detach().double()
    params = list(model.parameters())
    per_task = task_grads64(losses, params)
    total = weighting(losses)
    assert_close64(total, (factors * torch.exp(-s) * v + 0.5 * s).sum(), rtol=1e-6)
    weighting.backward(losses)
    assert_close64(
        weighting.log_vars.grad,
        -factors * torch.exp(-s) * v + 0.5,
        rtol=1e-6,
        what="d total / d log_vars",
    )
    assert_close64(
        flat_grad(params),
        (factors * torch.exp(-s)) @ per_task,
        rtol=1e-6,
        atol=1e-12,
        what="model grads",
    )
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
            rates = torch.tensor(period_means[p - 1], dtype=torch.float64) / torch.tensor(
                period_means[p - 2], dtype=torch.float64
            )
            out.append(k * torch.softmax(rates / temperature, 0))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dwa_period_steps_weights_match_float64_formula(temperature, dtype):
    period, steps = 3, 15
    sequence = loss_sequence(steps)
    means = [
        torch.tensor(sequence[i : i + period], dtype=torch.float64).mean(0).tolist()
        for i in range(0, steps, period)
    ]
    expected = dwa_oracle(means, K, temperature)
    weighting = DWA(K, temperature=temperature, period_steps=period)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for t, values in enumerate(sequence):
        losses = leaf_losses(values, dtype)
        total = weighting(losses)
        w = expected[t // period]
        assert_close64(
            total,
            (w * torch.tensor(values, dtype=torch.float64)).sum(),
            rtol=rtol,
            what=f"step {t}: total",
        )
        assert_close64(
            torch.stack(torch.autograd.grad(total, losses)),
            w,
            rtol=rtol,
            what=f"step {t}: dtotal/dL",
        )
        assert_close64(weighting.last_weights, w, rtol=rtol, what=f"step {t}: last_weights")
    assert not torch.allclose(expected[-1], torch.ones(K, dtype=torch.float64))
    assert float(expected[-1].sum()) == pytest.approx(K)


def test_dwa_end_period_with_uneven_periods():
    lengths = [2, 4, 1, 3, 2]
    sequence = loss_sequence(sum(lengths), seed=1)
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
        assert_close64(
            total, (w * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), rtol=1e-12
        )
        draws.append(w.log())
    logits = torch.stack(draws)
    # softmax determines z up to a shift: the pairwise differences z_i - z_j are N(0, 2)
    diffs = torch.stack(
        [logits[:, 0] - logits[:, 1], logits[:, 1] - logits[:, 2], logits[:, 0] - logits[:, 2]]
    )
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
    expected = torch.cat(
        [
            g.reshape(-1)
            for g in torch.autograd.grad(
                sum(torch.log(loss) for loss in losses), params, retain_graph=True
            )
        ]
    )
    RealTime(K).backward(losses)
    assert_close64(flat_grad(params), expected, rtol=1e-7, atol=1e-12)


def test_anchor_to_main_every_term_has_the_main_loss_magnitude():
    values = [0.4, 250.0, 3.0]
    losses = leaf_losses(values)
    total = AnchorToMain(K, main=0)(losses)
    assert_close64(total, 3 * 0.4, rtol=1e-7)


def test_loss_based_dict_losses_and_log_keys():
    weighting = Fixed(["a", "b", "c"], weights=[0.1, 0.2, 0.7])
    assert weighting.log() == {}
    total = weighting({"c": torch.tensor(1.0), "a": torch.tensor(10.0), "b": torch.tensor(100.0)})
    assert float(total) == pytest.approx(0.1 * 10 + 0.2 * 100 + 0.7 * 1, rel=1e-6)
    assert weighting.log() == pytest.approx({"weight/a": 0.1, "weight/b": 0.2, "weight/c": 0.7})


# -- FAMO --------------------------------------------------------------------------------------


def test_famo_against_its_update_rule():
    """Logits xi from 0, updated by SGD(lr) on J_softmax^T delta with delta the log-loss decrease;
    weights z / (c (L + eps)), c = sum z / (L + eps)."""
    lr, eps = 0.3, 1e-8
    method = weighting.FAMO(3, weight_optimizer=lambda p: torch.optim.SGD(p, lr=lr), eps=eps)
    g = torch.Generator().manual_seed(0)
    logits, previous = torch.zeros(3, dtype=torch.float64), None
    for _ in range(5):
        values = torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor(
            [1.0, 10.0, 0.1], dtype=torch.float64
        )
        losses = values.clone().requires_grad_()
        total = method(list(losses))
        if previous is not None:
            logits = logits.requires_grad_()
            delta = (previous + eps).log() - (values + eps).log()
            (grad,) = torch.autograd.grad(torch.softmax(logits, 0), logits, delta)
            logits = (logits - lr * grad).detach()
        previous = values
        z = torch.softmax(logits, 0)
        c = (z / (values + eps)).sum()
        torch.testing.assert_close(
            method.last_weights.double(), z / (c * (values + eps)), rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            total.double(), ((z * (values + eps).log()).sum() / c).double(), rtol=1e-6, atol=0
        )
        (grad_losses,) = torch.autograd.grad(total, losses)
        torch.testing.assert_close(grad_losses, method.last_weights.to(grad_losses))


# -- the constants a method derives from its buffers, cached (LossWeighting._constants) ---------

CACHED = sorted(
    name
    for name, cls in weighting.LOSS_BASED.items()
    if cls.constants is not weighting.LossWeighting.constants
)


def _assert_cache_fresh(method, values):
    """The cached constants are what ``constants`` computes now (bitwise)."""
    cached, fresh = method._constants(values), method.constants(values)
    assert len(cached) == len(fresh)
    for a, b in zip(cached, fresh):
        assert a.dtype == b.dtype == values.dtype and torch.equal(a, b), (a, b)


def test_some_methods_cache_constants():
    assert {"fixed", "pbi", "cosmos", "stch", "prior_loss", "alternating"} <= set(CACHED)


@pytest.mark.parametrize("name", CACHED)
def test_cached_constants_follow_the_buffers(name):
    """Written in place, reassigned, loaded from a state_dict, cast (.double()), or asked for in
    another dtype: the constants are computed again, never stale."""
    method = weighting.LOSS_BASED[name].example(3)
    values = torch.tensor([0.5, 2.0, 1.25])
    first = method._constants(values)
    assert method._constants(values) is first  # (cached: the same tuple)
    floats = [n for n, b in method.named_buffers() if b.is_floating_point()]
    for n in floats:  # in place
        with torch.no_grad():
            getattr(method, n).mul_(1.5)
        _assert_cache_fresh(method, values)
    for n in floats:  # reassigned
        setattr(method, n, getattr(method, n).clone() * 0.5)
        _assert_cache_fresh(method, values)
    twin = weighting.LOSS_BASED[name].example(3)
    twin._constants(values)
    twin.load_state_dict(method.state_dict())
    _assert_cache_fresh(twin, values)
    _assert_cache_fresh(method, values.double())
    method.double()
    _assert_cache_fresh(method, values)
    _assert_cache_fresh(method, values.double())
