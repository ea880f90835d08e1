"""No host synchronisation in a gradient-based step (issue 16): over the GRADIENT_BASED registry,

(a) each method's ``coefficients(gramian, losses)`` compiles with ``torch.compile(fullgraph=True)``
    (a data-dependent Python branch or a host read would break the graph) and gives eager's
    results;
(b) ``step(task_grads, losses)`` as a whole, with on_nonfinite='ignore', compiles the same way;
(c) an eager step calls none of Tensor.item / __bool__ / tolist / __float__ / __int__ (the host
    reads a CUDA tensor would wait for), on finite and on non-finite gradients, and a non-finite
    step under 'ignore' passes the gradients through (coefficients 1) and leaves the state as it
    was;
(d) a step on the device path calls no torch.linalg function that synchronises a CUDA device
    inside torch (eigh, svd, pinv, ...: their error checks read LAPACK's info, which (c) cannot
    see): the solvers' eigendecompositions and pseudo-inverses go through fusedmtl.linalg.

Every method's solver runs on the device (no host algorithm is left); what (a) and (b) cannot
compile for a reason of torch's (a generator, torch.optim) is listed below as strict xfails.

(a), (b) and the non-finite step of (c) run on every device of the ``device`` fixture. On CUDA the
solvers take their device path (no CPU shortcuts), and the compiled functions (a second call, which
runs the graph) and the non-finite step run under torch.cuda.set_sync_debug_mode('error'), which
fails on any host synchronisation.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from weighting_cases import jacobian_params, make_jacobian, split_rows

from fusedmtl import multi_tensor
from fusedmtl import weighting as W
from fusedmtl.weighting import solvers
from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.methods.cagrad import cagrad_coefficients, cagrad_weights
from fusedmtl.weighting.methods.fairgrad import alpha_fair_weights
from fusedmtl.weighting.methods.nash_mtl import nash_bargaining
from fusedmtl.weighting.methods.pcd import priority_constrained_weights

K = 3
# Dynamo's full-graph capture is what proves the absence of host reads and value-dependent
# branches (either breaks the graph, an error with fullgraph=True); AOT autograd's eager backend
# runs the captured graph as traced, without inductor's code generation (minutes per method on a
# loaded CPU for the unrolled active-set loop).
BACKEND = "aot_eager"

# Drawn on the host from the shared CPU generator (no device value is read; the orders reach the
# device through pinned memory): the compiled part is everything after the draw.
HOST_ORDERS = {"pcgrad", "gradvac"}
# Read nothing on the host (torch's fused Adam), but torch.optim breaks dynamo's graph around
# every Optimizer.step on purpose (pytorch/pytorch#104053): no full graph with it.
TORCH_OPTIM = {"gradnorm": "its weight optimizer's step (torch.optim) breaks the graph by design"}


def _names(reasons):
    """The registry's names, those in ``reasons`` as strict xfails: a method whose test starts
    to pass (XPASS) fails until the table is updated."""
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=reasons[n]))
        if n in reasons
        else n
        for n in W.GRADIENT_BASED
    ]


NAMES = list(W.GRADIENT_BASED)
COEFFICIENT_NAMES = _names(
    {
        "excess_mtl": "its coefficients need the step's gradients element-wise, not the Gramian",
        **TORCH_OPTIM,
    }
)
STEP_NAMES = _names(
    {
        **{
            n: "its orders are drawn from a torch.Generator, which dynamo cannot trace"
            for n in HOST_ORDERS
        },
        "graddrop": "its sign draws come from a torch.Generator, which dynamo cannot trace",
        **TORCH_OPTIM,
    }
)


# The methods whose whole step compiles on CUDA too: the step's kernels (Gramian, combine) are the
# same for every method; these differ in what they add around them (a plain, a solver's, an own
# task table, a state commit).
CUDA_STEP_NAMES = ("grad_normalization", "upgrad", "db_mtl", "trimmed_mean", "moco")


def _build(name, dtype=torch.float64, device="cpu", **overrides):
    return W.GRADIENT_BASED[name].example(K, jacobian_params(dtype, device), **overrides)


def _problem(dtype, device="cpu"):
    jacobian = make_jacobian(K, seed=3, conflicting=True).to(device)
    gramian = (jacobian @ jacobian.T).to(dtype)
    losses = torch.tensor([0.5, 1.5, 3.0], dtype=dtype, device=device)
    return jacobian, gramian, losses


def _without_a_sync(device, no_host_sync):
    """On CUDA, a block in which a host synchronisation raises; nothing on the CPU (where the
    host reads are caught by _no_host_reads below)."""
    return no_host_sync() if torch.device(device).type == "cuda" else contextlib.nullcontext()


def _tolerance(dtype):
    # compiled kernels may reassociate sums: a few ulps of the dtype, amplified by the
    # conditioning of the K x K problems (cond ~1e2 on these matrices)
    eps = torch.finfo(dtype).eps
    return {"rtol": 1e4 * eps, "atol": 1e4 * eps}


def _state(method):
    return {name: b.clone() for name, b in method.named_buffers()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True, msg=name)


def _coefficients_fn(method):
    """method.coefficients, or for the methods that draw orders on the host, the tensor part
    after the draw (with the orders drawn from the same generator state)."""
    if isinstance(method, W.PCGrad):
        from fusedmtl.weighting.methods.pcgrad import draw_orders, pcgrad_coefficients

        def fn(gramian, losses):
            orders = draw_orders(method._generator.get(), K, gramian.device)
            return pcgrad_coefficients(gramian, orders), orders

        return fn, lambda gramian, losses, orders: pcgrad_coefficients(gramian, orders)
    if isinstance(method, W.GradVac):
        from fusedmtl.weighting.methods.gradvac import draw_orders, gradvac_coefficients

        def fn(gramian, losses):
            orders = draw_orders(method._generator.get(), K, gramian.device, n=K - 1)
            return gradvac_coefficients(gramian, method.targets, orders, 0.5, 1e-8), orders

        def tensor_part(gramian, losses, orders):
            return gradvac_coefficients(gramian, method.targets, orders, 0.5, 1e-8)

        return fn, tensor_part
    return None, None


@pytest.mark.compile
@pytest.mark.parametrize("name", COEFFICIENT_NAMES)
def test_coefficients_compile_fullgraph_like_eager(name, device, no_host_sync):
    dtype = torch.float64
    _, gramian, losses = _problem(dtype, device)
    eager_method, compiled_method = _build(name, dtype, device), _build(name, dtype, device)
    torch._dynamo.reset()
    draw, tensor_part = _coefficients_fn(compiled_method)
    if draw is not None:
        expected, orders = _coefficients_fn(eager_method)[0](gramian, losses)
        _, orders_again = draw(gramian, losses)  # the same generator state, the same orders
        assert torch.equal(orders, orders_again)
        compiled = torch.compile(tensor_part, fullgraph=True, backend=BACKEND)
        args = (gramian, losses, orders)
    else:
        expected = eager_method.coefficients(gramian, losses)
        compiled = torch.compile(compiled_method.coefficients, fullgraph=True, backend=BACKEND)
        args = (gramian, losses)
    actual = compiled(*args)
    if isinstance(actual, tuple):
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, **_tolerance(dtype))
    else:
        torch.testing.assert_close(actual, expected, **_tolerance(dtype))
    _assert_same_state(_state(compiled_method), _state(eager_method))
    if device != "cpu":  # the compiled graph, called again, synchronises nothing
        with no_host_sync():
            compiled(*args)


def _weigh_without_grad(method, table, values):
    """GradientWeighting._weigh's steps for ``step`` (task table, Gramian kernel, coefficients
    with the finiteness policy, state commit, combine), returning the update instead of adding it
    to .grad: multi_tensor.combine_into_grad_ checks its parameters' storages, which dynamo does
    not trace."""
    table, _ = method._task_table(table, values, 1.0, False, False)
    gramian = method._gramian(table)
    coeffs, commit = method._coefficients_or_passthrough(gramian, values, None)
    if commit:
        method._commit(table)
    return coeffs, multi_tensor.combine(table, coeffs)


@pytest.mark.compile
@pytest.mark.cuda_subset(name=CUDA_STEP_NAMES)
@pytest.mark.parametrize("name", STEP_NAMES)
def test_step_compiles_fullgraph_like_eager(name, device, no_host_sync):
    """The step of a float32 model (Gramian kernel, coefficients, combine) under on_nonfinite=
    'ignore', against an eager ``step``; on CUDA a second compiled step synchronises nothing."""
    dtype = torch.float32
    jacobian, _, losses = _problem(dtype, device)
    eager_method = _build(name, dtype, device, on_nonfinite="ignore")
    compiled_method = _build(name, dtype, device, on_nonfinite="ignore")
    table = split_rows(jacobian.to(dtype))
    torch._dynamo.reset()
    expected = eager_method.step([[g.clone() for g in row] for row in table], losses)
    compiled = torch.compile(
        functools.partial(_weigh_without_grad, compiled_method), fullgraph=True, backend=BACKEND
    )
    actual, update = compiled([[g.clone() for g in row] for row in table], losses)
    torch.testing.assert_close(actual, expected, **_tolerance(dtype))
    for d, q in zip(update, eager_method._shared):
        torch.testing.assert_close(d, q.grad, **_tolerance(dtype))
    _assert_same_state(_state(compiled_method), _state(eager_method))
    if device != "cpu":
        copies = [[g.clone() for g in row] for row in table]
        with no_host_sync():
            compiled(copies, losses)


@contextlib.contextmanager
def _no_host_reads():
    """Makes every host read of a tensor's value raise (on the CPU they cost nothing, on CUDA
    each waits for the device): Tensor.item, __bool__, tolist, __float__ and __int__; and the
    solvers take their device path (no CPU shortcuts)."""
    names = ("item", "__bool__", "tolist", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    shortcuts, solvers.CPU_SHORTCUTS = solvers.CPU_SHORTCUTS, False  # the device path

    def forbid(n):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{n} during a step")

        return raiser

    try:
        for n in names:
            setattr(torch.Tensor, n, forbid(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        solvers.CPU_SHORTCUTS = shortcuts


def test_the_host_read_detector_detects():
    t = torch.ones(2)
    with _no_host_reads(), pytest.raises(AssertionError, match="host read"):
        bool(t.all())
    with _no_host_reads(), pytest.raises(AssertionError, match="host read"):
        t.tolist()
    assert bool(t.all()) and t.tolist() == [1.0, 1.0]  # restored


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_step_reads_nothing_on_the_host(name, dtype):
    jacobian, _, losses = _problem(dtype)
    method = _build(name, dtype, on_nonfinite="ignore")
    reference = _build(name, dtype)  # default policy, a host read allowed
    table = split_rows(jacobian.to(dtype))
    expected = reference.step([[g.clone() for g in row] for row in table], losses)
    with _no_host_reads():
        actual = method.step([[g.clone() for g in row] for row in table], losses)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(method.last_weights, expected, rtol=0, atol=0)


# torch.linalg's functions that synchronise a CUDA device with the host (their docs say so: the
# error check reads the LAPACK info), and the _ex ones that do with check_errors=True.
SYNCHRONISING_LINALG = {
    getattr(torch.linalg, n)
    for n in (
        "cholesky", "cond", "eig", "eigh", "eigvals", "eigvalsh", "inv", "ldl_factor",
        "lu_factor", "matrix_rank", "pinv", "solve", "svd", "svdvals",
    )
}  # fmt: skip
CHECKED_EX = {torch.linalg.cholesky_ex, torch.linalg.inv_ex, torch.linalg.ldl_factor_ex,
              torch.linalg.lu_factor_ex, torch.linalg.solve_ex}  # fmt: skip


class _SynchronisingLinalgCalls(torch.overrides.TorchFunctionMode):
    """Records the torch.linalg calls that would synchronise a CUDA device (seen on the CPU)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCHRONISING_LINALG or (func in CHECKED_EX and kwargs.get("check_errors")):
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_step_calls_no_synchronising_linalg(name):
    """What torch.cuda.set_sync_debug_mode('error') would catch inside torch's C++ on a GPU, seen
    from the CPU: a step on the device path (no CPU shortcuts) calls no torch.linalg function
    that synchronises a CUDA device (those whose error check reads LAPACK's info)."""
    jacobian, _, losses = _problem(torch.float64)
    method = _build(name, on_nonfinite="ignore")
    table = split_rows(jacobian)
    method.step([[g.clone() for g in row] for row in table], losses)  # (state created)
    with _no_host_reads(), _SynchronisingLinalgCalls() as recorded:
        method.step([[g.clone() for g in row] for row in table], losses)
    assert recorded.calls == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_step_synchronises_nothing_on_cuda(name, no_host_sync):
    """What the test above proves on the CPU, on a GPU with torch's sync debug mode: a whole
    step (on_nonfinite='ignore') without a host synchronisation, and the coefficients of the
    same method stepped with the default policy (its host read allowed)."""
    jacobian, _, losses = _problem(torch.float32)
    table = split_rows(jacobian.float().cuda())
    losses = losses.cuda()

    def method(**overrides):
        params = jacobian_params(torch.float32, "cuda")
        return W.GRADIENT_BASED[name].example(K, params, **overrides)

    synced, unsynced = method(), method(on_nonfinite="ignore")
    for warm_up in (synced, unsynced):  # (the first step loads kernels and creates state)
        warm_up.step([[g.clone() for g in row] for row in table], losses)
    expected = synced.step([[g.clone() for g in row] for row in table], losses)
    copies = [[g.clone() for g in row] for row in table]
    with no_host_sync():
        actual = unsynced.step(copies, losses)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_step_under_ignore_passes_through_without_host_reads(
    name, bad, device, no_host_sync
):
    """Coefficients 1, the non-finite gradients reach .grad (a GradScaler would see them), and
    the method's state is as before the step (buffers compared exactly)."""
    dtype = torch.float64
    jacobian, _, losses = _problem(dtype, device)
    method = _build(name, dtype, device, on_nonfinite="ignore")
    method.step(split_rows(jacobian), losses)  # some state first
    for p in method._shared:
        p.grad = None
    before = _state(method)
    table = split_rows(jacobian)
    table[1][0][0, 0] = bad
    with _no_host_reads(), _without_a_sync(device, no_host_sync):
        coeffs = method.step(table, losses)
    torch.testing.assert_close(coeffs, torch.ones(K, dtype=dtype, device=device), rtol=0, atol=0)
    assert not torch.isfinite(method._shared[0].grad[0, 0])
    # (a method with its own table passes that through: DB-MTL's running averages of g_i / L_i,
    # TrimmedMean's and GradDrop's masked gradients, MoCo's tracked ones)
    if type(method)._task_table is GradientWeighting._task_table:
        torch.testing.assert_close(method._shared[1].grad, sum(row[1] for row in table))
    _assert_same_state(_state(method), before)


def test_raise_and_skip_still_tell_the_user():
    """The two policies that keep their documented host read."""
    jacobian, _, losses = _problem(torch.float64)
    table = split_rows(jacobian)
    table[0][2][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _build("upgrad").step(table, losses)
    with pytest.warns(UserWarning, match="skipping"):
        assert _build("upgrad", on_nonfinite="skip").step(table, losses) is None


def _degenerate_gramians():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 7, generator=g, dtype=torch.float64)
    wide = torch.randn(12, 5, generator=g, dtype=torch.float64)  # K > G: rank 5
    rank1 = torch.logspace(-1, 1, 6, dtype=torch.float64)[:, None] * a  # parallel
    jacobians = {
        "identical": a.expand(4, -1),
        "opposite": torch.stack([a, -a, b]),
        "zero_gradient": torch.stack([a, torch.zeros_like(a), b]),
        "all_zero": torch.zeros(3, 7, dtype=torch.float64),
        "K>G": wide,
        "parallel": rank1,
        "conflicting": make_jacobian(5, seed=9, conflicting=True),
    }
    out = {}
    for name, J in jacobians.items():
        out[f"{name}-float64"] = J @ J.T
        out[f"{name}-float32"] = J.float() @ J.float().T
    return out


DEGENERATE = _degenerate_gramians()


def _pcd_qp(M, validate=True):
    k = M.shape[0]
    return priority_constrained_weights(M.double(), torch.full((k - 1,), 0.3, dtype=torch.float64))


FIXED_COUNT_SOLVERS = {
    "mgda": solvers.min_norm_simplex,
    "upgrad": solvers.upgrad_coefficients,
    "dual_cone": solvers.dual_cone_weights,
    "cagrad_weights": functools.partial(cagrad_weights, c=0.5),
    "cagrad": functools.partial(cagrad_coefficients, c=0.5),
    "cagrad_c2": functools.partial(cagrad_coefficients, c=2.0),
    "nash_mtl": nash_bargaining,
    "fairgrad": functools.partial(alpha_fair_weights, alpha=2.0),
    "pcd": _pcd_qp,
}


@pytest.mark.parametrize("matrix", list(DEGENERATE))
@pytest.mark.parametrize("solver", list(FIXED_COUNT_SOLVERS))
def test_fixed_count_device_path_equals_the_early_exit(solver, matrix):
    """The active-set, homotopy and Newton loops run to their bound with masks (the device path,
    forced on the CPU) give the answer of the CPU path (the loop that stops at convergence, or
    for an NNLS with K <= 8 the enumeration of its supports), on degenerate Gramians too."""
    solver, M = FIXED_COUNT_SOLVERS[solver], DEGENERATE[matrix]
    expected = solver(M)
    with _no_host_reads():
        actual = solver(M, validate=False)
    assert bool(torch.isfinite(actual).all())
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
