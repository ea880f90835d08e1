"""fusedmtl.multi_tensor: thread-count and CPU-capability determinism, torch.compile, properties.

The oracle and the precision contract are in multi_tensor_oracle.py."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multi_tensor_oracle import (
    _CAPABILITY_ORDER,
    CAPABILITIES,
    Problem,
    _values,
    build_problem,
    check_combine,
    check_gramian,
    check_norms,
    layout_problem,
    penalty_params,
    random_coeffs,
)

import fusedmtl
import fusedmtl._C
import fusedmtl.multi_tensor as mt
from tests.helpers import BACKENDS, DEVICES, assert_bitwise, backends_on, skip_without_a_gpu

# Determinism: thread count and CPU capability (native backend)


def _run_everything(prob, params_fn):
    """All results of the API on ``prob`` (and the penalty on fresh parameters), as tensors."""
    c = random_coeffs(prob.K)
    results = [mt.norms(prob.lists()), mt.gramian(prob.lists())]
    results += [o for o in mt.combine(prob.lists(), c) if o is not None]
    outs, norms = mt.normalized_sum(prob.lists())
    results += [o for o in outs if o is not None] + [norms]
    out = [torch.ones(s, dtype=prob.dtype) for s in prob.shapes]
    results += mt.combine(prob.lists(), c, out=out, accumulate=True)
    params = params_fn()
    results.append(mt.l1_l2_penalty_(params, l1=0.01, l2=0.02))
    results += [w.grad for w in params]
    trimmed = [[g.clone() if g is not None else None for g in grads] for grads in prob.lists()]
    mt.trim_(trimmed, (prob.K - 1) // 2)
    results += [g for grads in trimmed for g in grads if g is not None]
    dropped = [[g.clone() if g is not None else None for g in grads] for grads in prob.lists()]
    generator = torch.Generator().manual_seed(73)
    uniforms = [torch.rand(s, generator=generator, dtype=prob.dtype) for s in prob.shapes]
    mt.sign_dropout_(dropped, uniforms, torch.linspace(0, 0.5, prob.K))
    results += [g for grads in dropped for g in grads if g is not None]
    return results


@functools.lru_cache(maxsize=None)
def _problem_3m():
    return build_problem(
        [(3_000_017,), (1023,), (7,), (2, 3), (40_000,)], 3, torch.float32, seed=70
    )


@pytest.mark.slow
def test_thread_count_determinism(restore_num_threads):
    prob = _problem_3m()

    def params_fn():
        return penalty_params(
            torch.float32,
            "mixed",
            seed=71,  # noqa: E731
            shapes=[(3_000_017,), (5,), (1023,)],
        )

    with fusedmtl.backend.use("native"):
        torch.set_num_threads(1)
        one = _run_everything(prob, params_fn)
        torch.set_num_threads(2)
        two = _run_everything(prob, params_fn)
    assert len(one) == len(two)
    for k, (a, b) in enumerate(zip(one, two)):
        assert_bitwise(b, a, f"result {k}: 2 threads vs 1")
    check_gramian(prob, one[1])


@pytest.mark.parametrize("layout", ["tiny", "odd", "none", "noncontig"])
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_cpu_capability_parity(capability, layout, restore_cpu_capability):
    prob = layout_problem(layout, torch.float32)
    params_fn = lambda: penalty_params(torch.float32, "mixed", seed=72)  # noqa: E731
    with fusedmtl.backend.use("native"):
        assert fusedmtl._C.set_cpu_capability("default") == "default"
        baseline = _run_everything(prob, params_fn)
        actual = fusedmtl._C.set_cpu_capability(capability)
        assert _CAPABILITY_ORDER[actual] <= _CAPABILITY_ORDER[capability]
        results = _run_everything(prob, params_fn)
    assert len(results) == len(baseline)
    for k, (a, b) in enumerate(zip(results, baseline)):
        assert_bitwise(a, b, f"result {k}: {actual} vs default")
    check_norms(prob, results[0])
    check_gramian(prob, results[1])


# --------------------------------------------------------------------------------------------
# torch.compile


# The CPU's native kernels; on CUDA the native and the Triton ones (the ops' fake kernels and their
# CUDA registrations are what the compiled graph calls; the reference is plain torch there).
COMPILE_CASES = [
    pytest.param(b, d, id=f"{b}-{d}")
    for d in DEVICES
    for b in (("native",) if d == "cpu" else ("native", "triton"))
    if b in backends_on(d)
]


@pytest.mark.compile
@pytest.mark.parametrize("backend_name, device", COMPILE_CASES)
def test_torch_compile(backend_name, device, no_host_sync):
    """gramian and combine inside a fullgraph-compiled function (gradient normalisation); on CUDA
    the compiled function runs again without a host synchronisation."""
    skip_without_a_gpu(device)
    torch._dynamo.reset()
    try:

        def fn(a0, a1, b0, b1):
            task_grads = [[a0, a1], [b0, b1]]
            m = mt.gramian(task_grads)
            c = 1.0 / (m.diagonal().sqrt() + 1e-8)
            return m, mt.combine(task_grads, c)

        prob = build_problem([(5, 3), (11,)], 2, torch.float32, seed=80)
        args = [t for row in prob.lists(device=device) for t in row]
        with fusedmtl.backend.use(backend_name):
            compiled = torch.compile(fn, fullgraph=True)
            m_c, outs_c = compiled(*args)
            m_e, outs_e = fn(*args)
            if device != "cpu":
                with no_host_sync():
                    compiled(*args)
        check_gramian(prob, m_c, "compiled gramian")
        assert_bitwise(m_c, m_e, "compiled gramian vs eager")
        assert len(outs_c) == 2
        for p in range(2):
            assert outs_c[p].shape == prob.shapes[p]
            torch.testing.assert_close(outs_c[p], outs_e[p], rtol=1e-6, atol=1e-7)
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Property test


@st.composite
def _gradient_problems(draw):
    K = draw(st.integers(1, 6))
    P = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    shapes = [tuple(draw(st.lists(st.integers(0, 5), max_size=3))) for _ in range(P)]
    transposed = [len(s) >= 2 and draw(st.booleans()) for s in shapes]
    kinds = [
        [draw(st.sampled_from(["normal", "normal", "normal", "zero", "none"])) for _ in range(P)]
        for _ in range(K)
    ]
    seed = draw(st.integers(0, 2**31 - 1))
    backend = draw(st.sampled_from(BACKENDS))
    as_tuples = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i in range(K):
        row = []
        for p, shape in enumerate(shapes):
            if kinds[i][p] == "none":
                row.append(None)
                continue
            scale = 10.0 ** float(torch.randint(-2, 3, (), generator=gen))
            base_shape = shape[:-2] + (shape[-1], shape[-2]) if transposed[p] else shape
            t = _values(base_shape, dtype, gen, scale)
            if kinds[i][p] == "zero":
                t = torch.zeros_like(t)
            row.append(t.transpose(-1, -2) if transposed[p] else t)
        grads.append(row)
    coeffs = [float(x) for x in torch.randn(K, generator=gen, dtype=torch.float64)]
    return Problem(shapes, grads, dtype), backend, as_tuples, coeffs


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_gradient_problems())
def test_property_gramian(problem):
    prob, backend, as_tuples, coeffs = problem
    task_grads = prob.lists(tuple if as_tuples else list)
    with fusedmtl.backend.use(backend):
        gram = mt.gramian(task_grads)
        norms = mt.norms(task_grads)
        outs = mt.combine(task_grads, coeffs)
    check_gramian(prob, gram)
    check_norms(prob, norms)
    check_combine(prob, torch.tensor(coeffs, dtype=torch.float64), outs)
    g64 = gram.double()
    trace = float(g64.diagonal().sum())
    eigenvalues = torch.linalg.eigvalsh(g64)
    assert float(eigenvalues.min()) >= -1e-5 * trace, (eigenvalues, trace)
