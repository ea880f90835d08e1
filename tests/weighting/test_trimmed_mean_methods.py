"""TrimmedMean against torchjd 0.18's TrimmedMean (the oracle) on the same float64 Jacobians, split
over several parameters (the masks are per parameter, the trimmed mean per coordinate); ties,
degenerate and wide Jacobians; a trimmed overflow still detected; a shared-trunk backward."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

G = 20


def _params():
    return [
        torch.zeros(5, 2, dtype=torch.float64, requires_grad=True),
        torch.zeros(G - 10, dtype=torch.float64, requires_grad=True),
    ]


def _rows(jacobian):
    return [[row[:10].reshape(5, 2).clone(), row[10:].clone()] for row in jacobian]


def _update(jacobian, trim, **kwargs):
    method = weighting.TrimmedMean(_params(), jacobian.shape[0], trim_number=trim, **kwargs)
    coeffs = method.step(_rows(jacobian))
    return torch.cat([p.grad.reshape(-1) for p in method._shared]), coeffs, method


def _jacobian(k: int, seed: int, conflicting: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, G, generator=gen, dtype=torch.float64)
    jacobian *= torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    if conflicting:
        jacobian[1:] -= (
            1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
        )
    return jacobian


@pytest.mark.parametrize("k,trim", [(3, 0), (3, 1), (5, 1), (5, 2), (8, 3), (64, 20)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("conflicting", [False, True])
def test_agrees_with_torchjd(k, trim, seed, conflicting):
    jacobian = _jacobian(k, seed, conflicting)
    d, coeffs, _ = _update(jacobian, trim)
    expected = torchjd_aggregation.TrimmedMean(trim_number=trim)(jacobian)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(coeffs, torch.full((k,), 1.0 / (k - 2 * trim), dtype=torch.float64))


@pytest.mark.parametrize(
    "kind", ["identical", "ties", "zero_gradient", "all_zero", "opposite", "k_exceeds_g"]
)
def test_degenerate_jacobians_agree_with_torchjd(kind):
    g = _jacobian(1, 4, False)[0]
    gen = torch.Generator().manual_seed(2)
    jacobian = {
        "identical": g.repeat(5, 1),
        # small integers: most coordinates have ties, at the trimmed boundary too
        "ties": torch.randint(-2, 3, (7, G), generator=gen).double(),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), -g, 2 * g, 0.5 * g]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
        "opposite": torch.stack([g, -g, g, -g, 3 * g]),
        "k_exceeds_g": torch.randn(30, G, generator=gen, dtype=torch.float64),
    }[kind]
    trim = (jacobian.shape[0] - 1) // 2
    d, _, _ = _update(jacobian, trim)
    torch.testing.assert_close(
        d, torchjd_aggregation.TrimmedMean(trim_number=trim)(jacobian), rtol=1e-12, atol=1e-14
    )
    if kind == "identical":
        torch.testing.assert_close(d, g, rtol=1e-12, atol=0)


def test_median_is_the_coordinate_wise_median_and_robust_to_an_outlier():
    jacobian = _jacobian(5, 7, False)
    jacobian[3] = 1e6  # one adversarial task
    d, _, _ = _update(jacobian, 2)
    torch.testing.assert_close(d, jacobian.median(dim=0).values, rtol=0, atol=0)
    assert float(d.abs().max()) < 100


def test_a_missing_task_gradient_counts_as_zeros():
    jacobian = _jacobian(3, 8, True)
    method = weighting.TrimmedMean(_params(), 3, trim_number=1)
    rows = _rows(jacobian)
    rows[1][0] = None  # task 1 does not reach the first parameter
    method.step(rows)
    expected = jacobian.clone()
    expected[1, :10] = 0
    d = torch.cat([p.grad.reshape(-1) for p in method._shared])
    torch.testing.assert_close(d, expected.median(dim=0).values, rtol=0, atol=0)


def test_a_trimmed_overflow_is_still_non_finite():
    jacobian = _jacobian(3, 9, False)
    jacobian[0, 0] = float("inf")  # the largest value of its coordinate: trimmed
    with pytest.raises(ValueError, match="non-finite"):
        _update(jacobian, 1)
    method = weighting.TrimmedMean(_params(), 3, trim_number=1, on_nonfinite="skip")
    with pytest.warns(UserWarning, match="skipping"):
        assert method.step(_rows(jacobian)) is None
    assert all(p.grad is None for p in method._shared)


def test_too_few_tasks_raise():
    with pytest.raises(ValueError, match="at least 5"):
        weighting.TrimmedMean(_params(), 4, trim_number=2)
    with pytest.raises(ValueError, match="trim_number"):
        weighting.TrimmedMean(_params(), 4, trim_number=-1)
    with pytest.raises(ValueError, match="at least 3"):
        weighting.TrimmedMean().coefficients(torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
def test_backward_on_a_shared_trunk(grad_mode):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(5)]
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(5, 16, 1, dtype=torch.float64)

    def losses():
        z = torch.tanh(trunk(x))
        return [torch.nn.functional.mse_loss(h(z), y[i]) for i, h in enumerate(heads)]

    shared = list(trunk.parameters())
    jacobian = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses()
        ]
    )
    method = weighting.TrimmedMean(shared, 5, trim_number=1, grad_mode=grad_mode)
    method.backward(losses())
    d = torch.cat([p.grad.reshape(-1) for p in shared])
    expected = torchjd_aggregation.TrimmedMean(trim_number=1)(jacobian)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14)
    for i, head in enumerate(heads):
        own = torch.autograd.grad(losses()[i], list(head.parameters()))
        for p, e in zip(head.parameters(), own):
            torch.testing.assert_close(p.grad, e)
