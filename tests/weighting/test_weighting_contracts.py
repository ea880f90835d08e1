"""The contracts every weighting keeps, run over the registries (fusedmtl.weighting.LOSS_BASED and
GRADIENT_BASED, each method built by its ``example``): .grad accumulates like autograd, heads get
their own loss's gradient, both gradient modes agree, dicts of losses in any order, the
non-finite policies, zero and unreachable task gradients, degenerate Jacobians, permutations.

The oracles: float64 per-task gradients from torch.autograd (``task_grads64``), fresh runs of the
same method (a deepcopy carries its state), and the formulas where a method has a closed form.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from weighting_cases import (
    EPS,
    GRAD_MODES,
    GRADIENT_NAMES,
    LOSS_NAMES,
    METHOD_NAMES,
    METHODS,
    K,
    SharedTrunkNet,
    assert_close64,
    build,
    flat_grad,
    head_grads64,
    is_gradient_based,
    jacobian_params,
    make_jacobian,
    model_losses,
    snapshot,
    split_rows,
    step_update,
    task_grads64,
)

import fusedmtl
import fusedmtl.nn
from fusedmtl import weighting as W

# -- accumulation -------------------------------------------------------------------------------


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_backward_accumulates_into_existing_grad_and_creates_missing(name, batch):
    fresh = SharedTrunkNet(seed=4)
    build(name, fresh).backward(model_losses(fresh, batch))
    single = _grads(fresh)
    model = SharedTrunkNet(seed=4)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(9)
    existing = {}
    for i, p in enumerate(params):
        if i % 2 == 0:  # every other parameter has a .grad already, the rest None
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            existing[i] = p.grad.clone()
    build(name, model).backward(model_losses(model, batch))
    for i, (p, g) in enumerate(zip(params, single)):
        assert p.grad is not None
        expected = existing[i] + g if i in existing else g
        assert_close64(p.grad, expected, rtol=1e-12, atol=1e-14, what=f"param {i}")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_second_backward_adds_the_second_step_like_autograd(name, batch):
    """Two backward calls leave the sum of the two steps' updates, the second one being what the
    method does from the state the first left (a deepcopy taken in between)."""
    model = SharedTrunkNet(seed=5)
    weighting = build(name, model)
    weighting.backward(model_losses(model, batch))
    first = _grads(model)
    twin_model = SharedTrunkNet(seed=5)
    twin = copy.deepcopy(weighting)
    if is_gradient_based(name):
        twin._shared = twin_model.shared
    twin.backward(model_losses(twin_model, batch))
    weighting.backward(model_losses(model, batch))
    for i, (p, a, b) in enumerate(zip(model.parameters(), first, _grads(twin_model))):
        assert_close64(p.grad, a + b, rtol=1e-12, atol=1e-14, what=f"param {i}")


# -- task-specific parameters, gradient modes, dicts --------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_heads_get_only_their_own_loss_gradient(name, model, batch):
    losses = model_losses(model, batch)
    heads = head_grads64(model, losses)
    build(name, model).backward(losses)
    for i, head in enumerate(model.heads):
        assert_close64(
            flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i}"
        )


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_loop_and_batched_grad_modes_agree(name, batch):
    results = []
    for mode in GRAD_MODES:
        model = SharedTrunkNet(seed=7)
        coeffs = build(name, model, grad_mode=mode).backward(model_losses(model, batch))
        results.append((coeffs, _grads(model)))
    (c_loop, loop), (c_batched, batched) = results
    assert_close64(c_batched, c_loop, rtol=1e-9, atol=1e-12)
    for i, (a, b) in enumerate(zip(batched, loop)):
        assert_close64(a, b, rtol=1e-9, atol=1e-13, what=f"param {i}")


def test_invalid_grad_mode_raises(model, batch):
    with pytest.raises(ValueError):
        W.GradNormalization(model.shared, K, grad_mode="vmap").backward(model_losses(model, batch))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_dict_losses_in_any_order_equal_list_in_task_order(name, batch):
    names = ["reg", "big", "cls"]
    listed_model = SharedTrunkNet(seed=8)
    listed = build(name, listed_model, names)
    c_listed = listed.backward(model_losses(listed_model, batch))
    model = SharedTrunkNet(seed=8)
    weighting = build(name, model, names)
    l0, l1, l2 = model_losses(model, batch)
    coeffs = weighting.backward({"cls": l2, "reg": l0, "big": l1})
    assert_close64(coeffs, c_listed, rtol=1e-12)
    for a, b in zip(model.parameters(), listed_model.parameters()):
        assert_close64(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    log = weighting.log()
    assert {f"weight/{n}" for n in names} <= set(log)
    assert [log[f"weight/{n}"] for n in names] == pytest.approx(
        weighting.last_weights.tolist(), rel=1e-12
    )


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_log_names_norms_and_cosines_of_the_named_tasks(name, model, batch):
    names = ["reg", "big", "cls"]
    weighting = build(name, model, names, track_conflict=True)
    weighting.backward(dict(zip(names, model_losses(model, batch))))
    log = weighting.log()
    pairs = {"cosine/reg,big", "cosine/reg,cls", "cosine/big,cls"}
    assert set(log) == {f"weight/{n}" for n in names} | {f"grad_norm/{n}" for n in names} | pairs
    assert [log[f"grad_norm/{n}"] for n in names] == pytest.approx(
        weighting.last_grad_norms.tolist(), rel=1e-12
    )
    assert log["cosine/reg,cls"] == pytest.approx(float(weighting.last_cosine[0, 2]), rel=1e-12)
    assert all(-1 - 1e-12 <= log[pair] <= 1 + 1e-12 for pair in pairs)


def test_unnamed_tasks_take_their_names_from_the_first_dict():
    weighting = W.RealTime(2)
    weighting({"depth": torch.tensor(2.0), "seg": torch.tensor(4.0)})
    assert set(weighting.log()) == {"weight/depth", "weight/seg"}
    assert weighting.log()["weight/seg"] == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("track_conflict", [False, True])
def test_last_cosine_matches_float64_oracle(track_conflict, model, batch):
    losses = model_losses(model, batch)
    G = task_grads64(losses, model.shared)
    weighting = W.GradNormalization(model.shared, K, track_conflict=track_conflict)
    assert (
        weighting.last_weights is None
        and weighting.last_grad_norms is None
        and weighting.last_cosine is None
    )
    weighting.backward(losses)
    if not track_conflict:
        assert weighting.last_cosine is None
        return
    norms = G.norm(dim=1)
    cosine = (G @ G.T) / (norms[:, None] * norms[None, :])
    assert_close64(weighting.last_cosine, cosine, rtol=1e-9, atol=1e-12)
    assert bool(
        (cosine - torch.eye(K, dtype=torch.float64)).abs().max() > 1e-3
    )  # not a trivial matrix


# -- malformed input ----------------------------------------------------------------------------

BAD_INPUTS = {
    "too-few": lambda ls: ls[:2],
    "too-many": lambda ls: ls + [ls[0] * 2],
    "non-scalar": lambda ls: [ls[0], ls[1], torch.stack([ls[2], ls[2]])],
    "integer": lambda ls: [ls[0], ls[1], torch.tensor(3)],
    "float-first": lambda ls: [float(ls[0]), ls[1], ls[2]],
    "tuple-with-a-float": lambda ls: (ls[0], ls[1], 2.0),
    "other-device": lambda ls: [
        ls[0],
        ls[1],
        torch.tensor(1.0, dtype=torch.float64, device="meta"),
    ],
    "wrong-dict-keys": lambda ls: {"a": ls[0], "b": ls[1], "x": ls[2]},
    "missing-dict-key": lambda ls: {"a": ls[0], "b": ls[1]},
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_malformed_losses_raise_and_write_nothing(name, bad, model, batch):
    weighting = build(name, model, ["a", "b", "c"])
    state = snapshot(weighting)
    with pytest.raises((ValueError, TypeError)):
        weighting.backward(BAD_INPUTS[bad](model_losses(model, batch)))
    assert all(p.grad is None for p in model.parameters())
    assert snapshot(weighting) == state


def test_no_shared_params_raises():
    with pytest.raises(ValueError):
        W.GradNormalization([], K)


def test_unknown_nonfinite_policy_raises():
    with pytest.raises(ValueError):
        W.Fixed(K, on_nonfinite="warn")


# -- non-finite losses --------------------------------------------------------------------------


def _bad_losses(model, batch, value=float("nan")):
    l0, l1, l2 = model_losses(model, batch)
    return [l0, l1 * value, l2]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_based_nonfinite_raise_skip_ignore(name, value, model, batch):
    with pytest.raises(ValueError):
        build(name)(_bad_losses(model, batch, value))
    weighting = build(name, on_nonfinite="skip")
    weighting.backward(model_losses(model, batch))  # one good step, then a bad one
    leaves = list(model.parameters()) + list(weighting.parameters())
    grads = [p.grad.clone() for p in leaves]
    weights = weighting.last_weights.clone()
    state = snapshot(weighting)
    twin = copy.deepcopy(weighting)
    with pytest.warns(UserWarning, match="non-finite"):
        assert weighting.backward(_bad_losses(model, batch, value)) is None
    for p, g in zip(leaves, grads):
        assert torch.equal(p.grad, g)
    assert snapshot(weighting) == state
    assert torch.equal(weighting.last_weights, weights)
    # the next good step is the one that would have come without the skipped one
    losses = model_losses(model, batch)
    weighting(losses)
    twin(losses)
    assert torch.equal(weighting.last_weights, twin.last_weights)
    ignoring = build(name, on_nonfinite="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = ignoring(_bad_losses(model, batch, value))
    assert not bool(total.isfinite())


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_gradient_based_nonfinite_raise_skip_ignore(name, batch):
    model = SharedTrunkNet(seed=11)
    with pytest.raises(ValueError):
        build(name, model).backward(_bad_losses(model, batch))
    weighting = build(name, model, on_nonfinite="skip")
    coeffs = weighting.backward(model_losses(model, batch))
    grads = _grads(model)
    state = snapshot(weighting)
    with pytest.warns(UserWarning, match="non-finite"):
        assert weighting.backward(_bad_losses(model, batch)) is None
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert snapshot(weighting) == state
    assert torch.equal(weighting.last_weights, coeffs)
    model.zero_grad(set_to_none=True)
    build(name, model, on_nonfinite="ignore").backward(
        _bad_losses(model, batch)
    )  # no check, no exception


# -- zero and unreachable task gradients --------------------------------------------------------


def _grad_normalization64(G):
    norms = G.norm(dim=1)
    return sum(G[i] / (norms[i] + EPS) for i in range(len(G)) if norms[i] > 0)


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_zero_gradient_task_gives_finite_coefficients_and_grads(name, model, batch):
    l0, l1, l2 = model_losses(model, batch)
    losses = [0.0 * l0, l1, l2]
    G = task_grads64(losses, model.shared)
    assert float(G[0].abs().max()) == 0.0
    weighting = build(name, model)
    coeffs = weighting.backward(losses)
    assert bool(coeffs.isfinite().all())
    assert float(weighting.last_grad_norms[0]) == 0.0
    for p in model.parameters():
        assert bool(p.grad.isfinite().all())
    if name == "grad_normalization":
        assert_close64(flat_grad(model.shared), _grad_normalization64(G), rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_task_without_path_to_shared_params_warns_and_counts_as_zero(name, grad_mode, model, batch):
    _, l1, l2 = model_losses(model, batch)
    l0 = (model.heads[0].weight ** 2).sum() + model.heads[0].bias.sum()  # reaches head 0 only
    losses = [l0, l1, l2]
    G = task_grads64(losses, model.shared)
    head0 = task_grads64([l0], list(model.heads[0].parameters()))[0]
    weighting = build(name, model, grad_mode=grad_mode)
    with pytest.warns(UserWarning, match="no path"):
        coeffs = weighting.backward(losses)
    assert bool(coeffs.isfinite().all())
    assert float(weighting.last_grad_norms[0]) == 0.0
    for p in model.parameters():
        assert bool(p.grad.isfinite().all())
    assert_close64(flat_grad(model.heads[0].parameters()), head0, rtol=1e-12)
    if name == "grad_normalization":
        assert_close64(flat_grad(model.shared), _grad_normalization64(G), rtol=1e-9, atol=1e-13)


# -- step(task_grads, losses) on explicit Jacobians ---------------------------------------------


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_step_leaves_the_given_gradients_untouched(name):
    """step() reads the caller's gradients; methods that transform them (DB-MTL) work on copies,
    so calling it twice with the same gradients is two steps on the same input."""
    task_grads = split_rows(make_jacobian(3, 5, conflicting=True))
    before = [[g.clone() for g in row] for row in task_grads]
    method = W.GRADIENT_BASED[name].example(3, jacobian_params())
    method.step(task_grads, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    for row, row_before in zip(task_grads, before):
        for g, g_before in zip(row, row_before):
            assert torch.equal(g, g_before)


def _degenerate(kind: str) -> torch.Tensor:
    g = make_jacobian(1, 0)[0]
    return {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "parallel": torch.stack([g, 3.0 * g, 0.01 * g]),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), make_jacobian(2, 1)[1]]),
        "all_zero": torch.zeros(2, g.numel(), dtype=torch.float64),
        "single_task": g[None],
    }[kind]


@pytest.mark.parametrize("name", GRADIENT_NAMES)
@pytest.mark.parametrize(
    "kind", ["identical", "opposite", "parallel", "zero_gradient", "all_zero", "single_task"]
)
def test_degenerate_gradients_give_a_finite_update(name, kind):
    jacobian = _degenerate(kind)
    method = W.GRADIENT_BASED[name].example(jacobian.shape[0], jacobian_params())
    losses = torch.linspace(1.0, 2.0, jacobian.shape[0], dtype=torch.float64)
    d, coeffs = step_update(method, jacobian, losses)
    assert torch.isfinite(coeffs).all(), coeffs
    assert torch.isfinite(d).all()
    if kind == "single_task" and name != "gradnorm":  # (GradNorm: the direction of W's norm)
        cosine = d @ jacobian[0] / (d.norm() * jacobian[0].norm())
        torch.testing.assert_close(cosine, torch.tensor(1.0, dtype=cosine.dtype))


@pytest.mark.parametrize(
    "name", [n for n in GRADIENT_NAMES if n not in ("pcgrad", "gradvac", "pcd")]
)  # PCGrad, GradVac: random orders; PCD: task 0 is the primary one
def test_permuting_the_tasks_permutes_the_coefficients(name):
    jacobian = make_jacobian(4, 3, conflicting=True)
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    cls = W.GRADIENT_BASED[name]
    coeffs = cls.example(4, jacobian_params()).step(split_rows(jacobian), losses)
    permuted = cls.example(4, jacobian_params()).step(split_rows(jacobian[perm]), losses[perm])
    torch.testing.assert_close(permuted, coeffs[perm], rtol=1e-7, atol=1e-10)


# -- issue 19's reproductions -------------------------------------------------------------------


def _prelude():
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(4, 8), [torch.nn.Linear(8, 1) for _ in range(2)]
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return trunk, heads, lambda: [torch.nn.functional.mse_loss(h(trunk(x)), y) for h in heads]


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_db_mtl_detached_and_expanded_gradient_losses(beta):
    """Point 3: a loss without a path warns and counts as a zero gradient; p.sum() (autograd
    hands back an expanded gradient) is not written in place. The oracle: DB-MTL's step() on the
    same gradients made explicit (zeros, a dense copy), over two steps so the averages count."""
    trunk, _, losses = _prelude()
    params = list(trunk.parameters())
    method, oracle = (
        W.DBMTL(params, 2, beta=beta),
        W.DBMTL([p.detach().clone().requires_grad_() for p in params], 2, beta=beta),
    )
    for step in range(2):
        first, second = losses()
        if step == 0:  # task 1 does not reach the trunk
            given = [first, second.detach()]
            rows = [torch.autograd.grad(first, params, retain_graph=True), [None, None]]
        else:  # task 0's gradient is an expanded tensor of ones (and none for the bias)
            given = [first.detach() * 0 + trunk.weight.sum(), second]
            rows = [[torch.ones_like(trunk.weight), None]]
            rows.append(torch.autograd.grad(second, params, retain_graph=True))
        values = torch.stack([loss.detach() for loss in given])
        trunk.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method.backward(given)
        assert any("no path" in str(w.message) for w in caught) == (step == 0)
        oracle.step([[g.clone() if g is not None else None for g in row] for row in rows], values)
        for p, q in zip(params, oracle._shared):
            assert_close64(p.grad, q.grad, rtol=1e-6, atol=1e-7, what=f"step {step}")
            q.grad = None


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_all_losses_detached_raise_and_one_detached_warns_on_both_sides(name):
    """Point 6: every method, loss- or gradient-based, raises like torch when no loss requires
    grad, and warns naming the task when one does not."""
    trunk, _, losses = _prelude()
    method = METHODS[name].example(2, list(trunk.parameters()))
    with pytest.raises(RuntimeError, match="requires grad"):
        method.backward([loss.detach() for loss in losses()])
    assert all(p.grad is None for p in trunk.parameters())
    first, second = losses()
    with pytest.warns(UserWarning, match="'1'"):
        method.backward([first, second.detach()])


def test_step_checks_the_losses():
    """Point 10: DBMTL.step without losses, and a wrong number of losses."""
    grads = split_rows(make_jacobian(2, 0))
    with pytest.raises(ValueError, match="needs the losses"):
        W.DBMTL(jacobian_params(), 2).step(grads)
    for name in GRADIENT_NAMES:
        with pytest.raises(ValueError, match="expected 2 losses"):
            W.GRADIENT_BASED[name].example(2, jacobian_params()).step(grads, torch.ones(3))


def test_features_empty_or_off_the_loss_path_raise():
    """Point 10: features=[] or features no loss depends on."""
    trunk, heads, losses = _prelude()
    method = W.MGDA(trunk.parameters(), 2)
    with pytest.raises(ValueError, match=r"features=\[\]"):
        method.backward(losses(), features=[])
    with pytest.raises(ValueError, match="no loss depends on the features"):
        method.backward(losses(), features=trunk(torch.randn(3, 4)))


def test_task_arguments_are_checked_at_construction():
    """Point 10: a string is not a list of names; more than 64 tasks fail at once."""
    with pytest.raises(TypeError, match="string"):
        W.Fixed("depth")
    trunk, _, _ = _prelude()
    with pytest.raises(ValueError, match="at most 64"):
        W.MGDA(trunk.parameters(), 65)
    assert W.Fixed(65).num_tasks == 65


@pytest.mark.parametrize("cls", [W.MGDA, W.IMTLG])
def test_a_zero_gradient_task_taking_all_the_weight_is_warned_once(cls, model, batch):
    l0, l1, l2 = model_losses(model, batch)
    method = cls(model.shared, ["depth", "seg", "cls"])
    with pytest.warns(UserWarning, match=r"\['depth'\]"):
        method.backward([0.0 * l0, l1, l2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l0, l1, l2 = model_losses(model, batch)
        method.backward([0.0 * l0, l1, l2])


# -- coefficients(gramian) alone (issue 14) -----------------------------------------------------


@pytest.mark.parametrize(
    "name", [n for n in GRADIENT_NAMES if n not in ("gradnorm", "excess_mtl")]
)  # (GradNorm's state is of W; ExcessMTL's excess risks are of the gradients element-wise)
def test_coefficients_alone_without_shared_params_or_tasks(name):
    """Built with no arguments, as torchjd's weightings are used: K comes from the Gramian, the
    coefficients are those of a fully built instance; stepping asks for what is missing."""
    jacobian = make_jacobian(3, 2, conflicting=True)
    gramian, losses = jacobian @ jacobian.T, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    cls = W.GRADIENT_BASED[name]
    settings = {"seed": 0} if name == "pcgrad" else {}
    alone = cls(**settings)
    torch.testing.assert_close(
        alone.coefficients(gramian, losses),
        cls.example(3, jacobian_params()).coefficients(gramian, losses),
        rtol=0,
        atol=0,
    )
    assert alone.num_tasks == 3
    with pytest.raises(ValueError, match="for 3 tasks"):
        alone.coefficients(torch.eye(2, dtype=torch.float64), losses[:2])
    with pytest.raises(ValueError, match="only computes coefficients"):
        alone.step(split_rows(jacobian), losses)


# -- issue 19's reproductions, continued ------------------------------------------------------


def _fused_losses(outputs, targets):
    """SharedTrunkNet's three tasks on fusedmtl's own losses (functional and nn forms), whose
    gradients must also pass through vmap (grad_mode="batched")."""
    (o0, o1, o2), (y0, y1, _) = outputs, targets
    return [
        fusedmtl.nn.SmoothL1Loss(beta=0.5)(o0, y0),
        fusedmtl.huber_loss(o1, y1, delta=0.7),
        fusedmtl.heteroscedastic_loss(o2[:, :1], y1, o2[:, 1:2]),
    ]


def _torch_losses(outputs, targets):
    """The same three losses from torch.nn.functional (the heteroscedastic one by its formula)."""
    (o0, o1, o2), (y0, y1, _) = outputs, targets
    s = o2[:, 1:2]
    return [
        F.smooth_l1_loss(o0, y0, beta=0.5),
        F.huber_loss(o1, y1, delta=0.7),
        (0.5 * torch.exp(-s) * (o2[:, :1] - y1) ** 2 + 0.5 * s).mean(),
    ]


@pytest.mark.parametrize("representation", [False, True], ids=["params", "features"])
@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_batched_grad_mode_through_fusedmtl_losses(name, representation, batch):
    """Point 2: vmap over fusedmtl's losses (no host read of grad_output) gives what the loop
    mode gives on torch's losses."""
    if representation and not W.GRADIENT_BASED[name].representation_mode:
        pytest.skip(f"{name} has no representation mode")
    overrides = {"beta": 0.0} if representation and name == "db_mtl" else {}  # (it needs it)
    results = []
    for losses_of, mode in ((_torch_losses, "loop"), (_fused_losses, "batched")):
        model = SharedTrunkNet(seed=7)
        z, outputs = model(batch[0])
        features = {"features": z} if representation else {}
        method = build(name, model, grad_mode=mode, **overrides)
        results.append((method.backward(losses_of(outputs, batch[1]), **features), _grads(model)))
    (c_torch, torch_grads), (c_fused, fused_grads) = results
    assert_close64(c_fused, c_torch, rtol=1e-9, atol=1e-12, what="coefficients")
    for i, (a, b) in enumerate(zip(fused_grads, torch_grads)):
        assert_close64(a, b, rtol=1e-9, atol=1e-13, what=f"param {i}")


@pytest.mark.parametrize("name", GRADIENT_NAMES)
def test_step_rejects_a_misshapen_gradient_before_any_state_moves(name):
    """Point 7: a (4, 3) gradient for a (3, 4) parameter (same element count) raises, and the
    method's state and .grad stay as they were."""
    params = jacobian_params()
    method = W.GRADIENT_BASED[name].example(2, params)
    grads = split_rows(make_jacobian(2, 0))
    method.step(grads, torch.tensor([1.0, 2.0]))  # a state worth corrupting
    before, grad_before = snapshot(method), [p.grad.clone() for p in params]
    grads[1][0] = grads[1][0].reshape(4, 3)
    with pytest.raises(ValueError, match=r"task 1's gradient of shared parameter 0 has shape"):
        method.step(grads, torch.tensor([1.0, 2.0]))
    assert snapshot(method) == before
    for p, g in zip(params, grad_before):
        assert torch.equal(p.grad, g)


def test_duplicate_shared_parameters_are_rejected_at_construction():
    """Point 8: the same parameter twice, or two overlapping views, would count twice in the norms
    and be added twice into .grad; disjoint views of one storage are distinct parameters."""
    trunk, _, _ = _prelude()
    for name in GRADIENT_NAMES:
        with pytest.raises(ValueError, match="share memory"):
            W.GRADIENT_BASED[name].example(2, [*trunk.parameters(), trunk.weight])
    flat = torch.zeros(10, requires_grad=True)
    with pytest.raises(ValueError, match="shared parameters 0 and 1 share memory"):
        W.GradNormalization([flat[:6], flat[4:]], 2)
    W.GradNormalization([flat[:6], flat[6:]], 2)


# -- state on another device than the step -----------------------------------------------------


def _state_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "move the weighting with the model" in str(w.message)]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_on_another_device_than_the_step_warns_once(name, model, batch):
    """Nothing moves a module but .to(): a method whose buffers or parameters stay where they
    were built while the model runs elsewhere copies them every step (on CUDA a synchronisation).
    The 'meta' device stands in for the other device on a CPU-only machine."""
    with warnings.catch_warnings(record=True) as caught:  # state and step on the CPU: no warning
        warnings.simplefilter("always")
        build(name, model).backward(model_losses(model, batch))
    assert _state_warnings(caught) == []
    method = build(name, model)
    if not [*method.parameters(), *method.buffers()]:
        pytest.skip("no buffers or parameters (nothing to move)")
    method.to("meta")
    expected = f"{type(method).__name__}: its state is on meta and its step on cpu"
    for attempt in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                method.backward(model_losses(model, batch))
            except (RuntimeError, NotImplementedError, ValueError):
                pass  # (meta state cannot take a CPU step: the warning came before)
        found = [message[: len(expected)] for message in _state_warnings(caught)]
        assert found == ([expected] if attempt == 0 else []), found  # once per device
