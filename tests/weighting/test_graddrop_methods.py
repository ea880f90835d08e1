"""GradDrop against torchjd 0.18's GradDrop (the oracle) on the same float64 Jacobians and the same
uniforms (fusedmtl's draws, one tensor per parameter, are recorded and handed to torchjd as its one
draw over the concatenated Jacobian); leak and f; degenerate Jacobians; the draws' state across a
state_dict round trip and skipped steps; a shared-trunk backward."""

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


def _jacobian(k: int, seed: int, conflicting: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, G, generator=gen, dtype=torch.float64)
    jacobian *= torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    if conflicting:
        jacobian[1:] -= (
            1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
        )
    return jacobian


class _Recorder:
    """torch.rand, recording what it returns."""

    def __init__(self, rand):
        self.rand, self.drawn = rand, []

    def __call__(self, *args, **kwargs):
        out = self.rand(*args, **kwargs)
        self.drawn.append(out.clone())
        return out


def _step(method, jacobian, monkeypatch):
    """(d written into .grad, the coefficients, the uniforms drawn, flattened)."""
    for p in method._shared:
        p.grad = None
    recorder = _Recorder(torch.rand)
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", recorder)
        coeffs = method.step(_rows(jacobian))
    d = torch.cat([p.grad.reshape(-1) for p in method._shared])
    return d, coeffs, torch.cat([u.reshape(-1) for u in recorder.drawn])


def _torchjd(jacobian, uniform, monkeypatch, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", lambda *args, **kw: uniform.clone())
        return torchjd_aggregation.GradDrop(**kwargs)(jacobian)


@pytest.mark.parametrize("k", [2, 3, 6, 64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("conflicting", [False, True])
def test_agrees_with_torchjd(k, seed, conflicting, monkeypatch):
    method = weighting.GradDrop(_params(), k, seed=seed)
    for step in range(3):
        jacobian = _jacobian(k, 10 * seed + step, conflicting)
        d, coeffs, uniform = _step(method, jacobian, monkeypatch)
        assert uniform.shape == (G,) and bool(((uniform >= 0) & (uniform < 1)).all())
        torch.testing.assert_close(d, _torchjd(jacobian, uniform, monkeypatch), rtol=0, atol=1e-14)
        torch.testing.assert_close(coeffs, torch.ones(k, dtype=torch.float64))


def test_leak_and_f_agree_with_torchjd(monkeypatch):
    leak = torch.tensor([0.0, 0.3, 1.0, 0.5], dtype=torch.float64)
    f = torch.sqrt  # increasing on [0, 1]
    method = weighting.GradDrop(_params(), 4, leak=leak, f=f, seed=3)
    jacobian = _jacobian(4, 5, True)
    d, _, uniform = _step(method, jacobian, monkeypatch)
    expected = _torchjd(jacobian, uniform, monkeypatch, leak=leak, f=f)
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-14)
    everything = weighting.GradDrop(_params(), 4, leak=torch.ones(4), seed=3)
    d, _, _ = _step(everything, jacobian, monkeypatch)
    torch.testing.assert_close(d, jacobian.sum(0), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["identical", "zero_gradient", "all_zero", "k_exceeds_g"])
def test_degenerate_jacobians_agree_with_torchjd(kind, monkeypatch):
    g = _jacobian(1, 4, False)[0]
    jacobian = {
        "identical": g.repeat(4, 1),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), -0.5 * g + 1.0]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
        "k_exceeds_g": torch.randn(
            30, G, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        ),
    }[kind]
    method = weighting.GradDrop(_params(), jacobian.shape[0], seed=2)
    d, _, uniform = _step(method, jacobian, monkeypatch)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, _torchjd(jacobian, uniform, monkeypatch), rtol=0, atol=1e-14)
    if kind == "identical":  # purity 0 or 1 everywhere: nothing is dropped
        torch.testing.assert_close(d, 4 * g, rtol=1e-14, atol=0)


def test_opposite_gradients_keep_exactly_one_sign_per_coordinate(monkeypatch):
    g = _jacobian(1, 6, False)[0]
    method = weighting.GradDrop(_params(), 2, seed=4)
    d, _, uniform = _step(method, torch.stack([g, -g]), monkeypatch)
    # purity 1/2: the positive value survives where U < 1/2, the negative one elsewhere
    expected = torch.where(uniform < 0.5, g.abs(), -g.abs())
    torch.testing.assert_close(d, expected, rtol=0, atol=0)


def test_draws_differ_by_step_and_seed_and_repeat_for_a_seed(monkeypatch):
    jacobian = _jacobian(3, 7, True)
    first = weighting.GradDrop(_params(), 3, seed=0)
    again = weighting.GradDrop(_params(), 3, seed=0)
    other = weighting.GradDrop(_params(), 3, seed=1)
    u0 = [_step(first, jacobian, monkeypatch)[2] for _ in range(2)]
    assert not torch.equal(u0[0], u0[1])
    assert torch.equal(_step(again, jacobian, monkeypatch)[2], u0[0])
    assert not torch.equal(_step(other, jacobian, monkeypatch)[2], u0[0])


def test_state_dict_round_trip_and_skipped_steps_continue_identically(monkeypatch):
    jacobians = [_jacobian(3, s, True) for s in range(5)]
    method = weighting.GradDrop(_params(), 3, seed=5)
    for jacobian in jacobians[:2]:
        _step(method, jacobian, monkeypatch)
    restored = weighting.GradDrop(_params(), 3, seed=77)
    restored.load_state_dict(method.state_dict())
    # a skipped step (non-finite gradients) draws nothing for good
    skipping = weighting.GradDrop(_params(), 3, seed=77, on_nonfinite="skip")
    skipping.load_state_dict(method.state_dict())
    bad = jacobians[2].clone()
    bad[0, 3] = float("nan")
    with pytest.warns(UserWarning, match="skipping"):
        assert skipping.step(_rows(bad)) is None
    for jacobian in jacobians[2:]:
        d = _step(method, jacobian, monkeypatch)[0]
        assert torch.equal(_step(restored, jacobian, monkeypatch)[0], d)
        assert torch.equal(_step(skipping, jacobian, monkeypatch)[0], d)
    assert method.state_dict()["_extra_state"]["steps_done"] == 5


def test_leak_is_checked():
    with pytest.raises(ValueError, match="leak"):
        weighting.GradDrop(_params(), 3, leak=torch.ones(2))
    with pytest.raises(ValueError, match="leak"):
        weighting.GradDrop(_params(), 2, leak=torch.tensor([0.5, 2.0]))


@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
def test_backward_on_a_shared_trunk(grad_mode, monkeypatch):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(3)]
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(3, 16, 1, dtype=torch.float64)

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
    method = weighting.GradDrop(shared, 3, seed=1, grad_mode=grad_mode)
    recorder = _Recorder(torch.rand)
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", recorder)
        method.backward(losses())
    uniform = torch.cat([u.reshape(-1) for u in recorder.drawn])
    d = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(d, _torchjd(jacobian, uniform, monkeypatch), rtol=1e-12, atol=1e-14)
    for i, head in enumerate(heads):
        own = torch.autograd.grad(losses()[i], list(head.parameters()))
        for p, e in zip(head.parameters(), own):
            torch.testing.assert_close(p.grad, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_kernel_and_the_torch_path_give_the_same_bits(dtype):
    """The identity f runs multi_tensor.sign_dropout_; any other f the torch operations, one
    parameter at a time: with f = an identity the kernel does not recognise, the same bits."""
    k = 5
    leak = torch.tensor([0.0, 0.3, 1.0, 0.5, 0.1], dtype=torch.float64)
    jacobian = _jacobian(k, 7, True).to(dtype)
    fused = weighting.GradDrop(_params(), k, leak=leak, seed=2)
    by_torch = weighting.GradDrop(_params(), k, leak=leak, seed=2, f=lambda p: p)
    for method in (fused, by_torch):
        for p in method._shared:
            p.data = p.data.to(dtype)
    for _ in range(2):
        fused.step(_rows(jacobian))
        by_torch.step(_rows(jacobian))
        for a, b in zip(fused._shared, by_torch._shared):
            assert a.grad.dtype == dtype
            assert torch.equal(a.grad, b.grad)
