"""CR-MOGM against torchjd 0.18's CRMOGMWeighting (the oracle) over several steps, wrapping the
same base method on both sides (UPGrad with an exact projector, IMTL-G, Krum), with torchjd's
default alpha and others, and initial weights; the moving average's formula in float64;
degenerate Jacobians; the state_dict round trip (the base's state with it); the refused bases."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
from torchjd.linalg import QuadprogProjector  # noqa: E402

G = 20
BASES = {
    "upgrad": (
        weighting.UPGrad,
        lambda: torchjd_aggregation.UPGradWeighting(
            projector=QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)
        ),
        1e-6,  # quadprog's tolerance
    ),
    "imtl_g": (weighting.IMTLG, torchjd_aggregation.IMTLGWeighting, 1e-9),
    "krum": (
        lambda: weighting.Krum(n_byzantine=1, n_selected=2),
        lambda: torchjd_aggregation.KrumWeighting(n_byzantine=1, n_selected=2),
        1e-12,
    ),
}


def _jacobians(k: int, seed: int, steps: int, conflicting: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        jacobian = torch.randn(k, G, generator=gen, dtype=torch.float64)
        jacobian *= torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
        if conflicting:
            jacobian[1:] -= (
                1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
            )
        out.append(jacobian)
    return out


def _method(k, base="upgrad", **kwargs):
    return weighting.CRMOGM(
        [torch.zeros(G, dtype=torch.float64, requires_grad=True)],
        k,
        base=BASES[base][0](),
        **kwargs,
    )


def _step(method, jacobian):
    for p in method._shared:
        p.grad = None
    coeffs = method.step([[row.clone()] for row in jacobian])
    return method._shared[0].grad.clone(), coeffs


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("k", [4, 7])
@pytest.mark.parametrize("conflicting", [False, True])
@pytest.mark.parametrize("alpha", [0.9, 0.3])
def test_agrees_with_torchjd_over_steps(base, k, conflicting, alpha):
    ours = _method(k, base, alpha=alpha)
    theirs = torchjd_aggregation.CRMOGMWeighting(BASES[base][1](), alpha=alpha)
    rtol = BASES[base][2]
    for jacobian in _jacobians(k, k, 5, conflicting):
        d, coeffs = _step(ours, jacobian)
        expected = theirs(jacobian @ jacobian.T)
        scale = float(expected.abs().max())
        torch.testing.assert_close(coeffs, expected, rtol=rtol, atol=rtol * scale)
        torch.testing.assert_close(d, coeffs @ jacobian, rtol=1e-12, atol=1e-14)


def test_the_moving_average_in_float64():
    """lambda_t = alpha lambda_{t-1} + (1 - alpha) lambda_hat_t from the given lambda_0, with the
    base's own coefficients as lambda_hat."""
    initial = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ours = _method(4, "imtl_g", alpha=0.6, initial_weights=initial)
    base = weighting.IMTLG()
    expected = initial
    for jacobian in _jacobians(4, 2, 4, True):
        _, coeffs = _step(ours, jacobian)
        expected = 0.6 * expected + 0.4 * base.coefficients(jacobian @ jacobian.T)
        torch.testing.assert_close(coeffs, expected, rtol=1e-14, atol=1e-15)
    theirs = torchjd_aggregation.CRMOGMWeighting(
        torchjd_aggregation.IMTLGWeighting(), alpha=0.6, initial_weights=initial
    )
    again = _method(4, "imtl_g", alpha=0.6, initial_weights=initial)
    for jacobian in _jacobians(4, 2, 4, True):
        torch.testing.assert_close(
            _step(again, jacobian)[1], theirs(jacobian @ jacobian.T), rtol=1e-9, atol=1e-12
        )


def test_alpha_0_is_the_base_and_alpha_1_freezes_the_first_weights():
    jacobians = _jacobians(3, 5, 3, True)
    plain, frozen = _method(3, alpha=0.0), _method(3, alpha=1.0)
    base = weighting.UPGrad()
    first = None
    for jacobian in jacobians:
        _, coeffs = _step(plain, jacobian)
        torch.testing.assert_close(coeffs, base.coefficients(jacobian @ jacobian.T))
        _, frozen_coeffs = _step(frozen, jacobian)
        first = frozen_coeffs if first is None else first
        assert torch.equal(frozen_coeffs, first)


@pytest.mark.filterwarnings("ignore:CRMOGM. task")  # (IMTL-G's zero-gradient warning)
@pytest.mark.parametrize("kind", ["identical", "opposite", "zero_gradient", "all_zero"])
def test_degenerate_gradients_agree_with_torchjd(kind):
    g = _jacobians(1, 4, 1, False)[0][0]
    jacobian = {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), -0.5 * g + 0.1]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
    }[kind]
    k = jacobian.shape[0]
    ours = _method(k, "imtl_g")
    theirs = torchjd_aggregation.CRMOGMWeighting(torchjd_aggregation.IMTLGWeighting())
    for _ in range(3):
        d, coeffs = _step(ours, jacobian)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(coeffs, theirs(jacobian @ jacobian.T), rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_carries_the_base_state():
    """With GradVac as the base, its targets and generator travel in CR-MOGM's state_dict."""
    jacobians = _jacobians(4, 3, 6, conflicting=True)

    def build(seed):
        return weighting.CRMOGM(
            [torch.zeros(G, dtype=torch.float64, requires_grad=True)],
            4,
            base=weighting.GradVac(seed=seed),
        )

    method = build(1)
    for jacobian in jacobians[:3]:
        _step(method, jacobian)
    state = method.state_dict()
    assert "base.targets" in state and "smoothed" in state
    restored = build(99)
    restored.load_state_dict(state)
    for jacobian in jacobians[3:]:
        assert torch.equal(_step(restored, jacobian)[1], _step(method, jacobian)[1])


@pytest.mark.parametrize("base", [weighting.DBMTL, weighting.TrimmedMean, weighting.GradDrop])
def test_table_changing_bases_are_refused(base):
    with pytest.raises(ValueError, match="Gramian alone"):
        weighting.CRMOGM([torch.zeros(2, requires_grad=True)], 3, base=base())
    with pytest.raises(ValueError, match="alpha"):
        weighting.CRMOGM(alpha=1.5)
