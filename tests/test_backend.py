"""fusedmtl.backend (python/fusedmtl/backend.py) and fusedmtl._C's CPU capability switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedmtl
import fusedmtl._C
from fusedmtl import backend

CAPABILITIES = ("default", "avx2", "avx512")
INFO_KEYS = {
    "torch",
    "torch_cuda",
    "cuda_device_available",
    "extension",
    "extension_error",
    "extension_cuda",
    "cpu_capability",
    "triton",
    "forced",
    "selected",
    "threads",
}


@pytest.fixture(autouse=True)
def _backend_is_restored():
    before = backend.current()
    yield
    assert backend.current() == before, "a test left a backend forced"


# --------------------------------------------------------------------------------------------
# use()


@pytest.mark.parametrize("name", ["auto", "native", "reference", "triton"])
def test_use_forces_and_restores(name):
    before = backend.current()
    with backend.use(name):
        assert backend.current() == name
        assert backend.info()["forced"] == name
    assert backend.current() == before


def test_use_nests():
    with backend.use("reference"):
        with backend.use("native"):
            assert backend.current() == "native"
            with backend.use("auto"):
                assert backend.current() == "auto"
            assert backend.current() == "native"
        assert backend.current() == "reference"


def test_use_restores_on_exception():
    before = backend.current()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with backend.use("reference"):
            assert backend.current() == "reference"
            raise Boom
    assert backend.current() == before
    # also when the exception comes from a loss inside the block
    with pytest.raises(RuntimeError):
        with backend.use("native"):
            fusedmtl.mse_loss(torch.empty(3, device="meta"), torch.empty(3, device="meta"))
    assert backend.current() == before


@pytest.mark.parametrize("name", ["bogus", "", "cuda", "nativ"])
def test_use_invalid_name(name):
    before = backend.current()
    with pytest.raises(ValueError) as error:
        with backend.use(name):
            pytest.fail("entered the block with an invalid backend")
    assert repr(name.strip().lower()) in str(error.value)
    for valid in ("auto", "native", "reference"):
        assert valid in str(error.value), "the message lists the valid names"
    assert backend.current() == before


# --------------------------------------------------------------------------------------------
# select()


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"], ids=str)
def test_select_auto_cpu_is_native(device):
    assert backend.native_available("cpu")
    assert backend.select(device) == "native"


def test_select_auto_meta_falls_back_to_reference():
    assert not backend.native_available("meta")
    assert backend.select("meta") == "reference"


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_select_forced_reference(device):
    with backend.use("reference"):
        assert backend.select(device) == "reference"


def test_select_forced_native_cpu():
    with backend.use("native"):
        assert backend.select("cpu") == "native"


def test_select_forced_native_on_unsupported_device():
    with backend.use("native"):
        with pytest.raises(RuntimeError, match="meta"):
            backend.select("meta")


@pytest.mark.parametrize("op", ["smooth_l1_loss", "huber_loss", "l1_loss", "mse_loss"])
def test_native_forced_on_meta_tensors_raises(op):
    x = torch.empty(4, 3, device="meta")
    y = torch.empty(4, 3, device="meta")
    with backend.use("native"):
        with pytest.raises(RuntimeError, match="native") as error:
            getattr(fusedmtl, op)(x, y)
    assert "meta" in str(error.value)
    # not forced: the same call works (reference on meta)
    assert getattr(fusedmtl, op)(x, y).device.type == "meta"


def test_select_forced_triton_on_meta_raises():
    with backend.use("triton"):
        with pytest.raises((RuntimeError, NotImplementedError)):
            backend.select("meta")


# --------------------------------------------------------------------------------------------
# Which implementation actually runs


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", ["native", "reference", "auto"])
def test_backend_choice_is_what_runs(name, reduction, requires_grad):
    x = torch.randn(5, 3, requires_grad=requires_grad)
    y = torch.randn(5, 3)
    with backend.use(name), _RecordOps() as recorder:
        loss = fusedmtl.smooth_l1_loss(x, y, reduction=reduction)
        if requires_grad:
            loss.backward(torch.ones_like(loss))
    fused_ops = [op for op in recorder.ops if op.startswith("fusedmtl.")]
    if name == "reference":
        assert fused_ops == [], recorder.ops
    else:
        assert fused_ops, f"no fusedmtl op ran under {name!r}: {recorder.ops}"


# --------------------------------------------------------------------------------------------
# info()


@pytest.mark.parametrize("name", ["auto", "native", "reference", "triton"])
def test_info(name):
    with backend.use(name):
        info = backend.info()
    assert INFO_KEYS <= set(info), f"missing keys {INFO_KEYS - set(info)}"
    assert info["forced"] == name
    assert info["torch"] == torch.__version__
    assert info["extension"] is True and info["extension_error"] is None
    assert info["cpu_capability"] == fusedmtl._C.cpu_capability()
    assert info["threads"] == torch.get_num_threads()
    assert info["cuda_device_available"] == torch.cuda.is_available()
    assert set(info["selected"]) >= {"cpu", "cuda"}
    expected_cpu = {"auto": "native", "native": "native", "reference": "reference"}.get(name)
    if expected_cpu is not None:
        assert info["selected"]["cpu"] == expected_cpu
    json.dumps(info)  # plain data, for bug reports


def test_info_follows_cpu_capability(restore_cpu_capability):
    assert fusedmtl._C.set_cpu_capability("default") == "default"
    assert backend.info()["cpu_capability"] == "default"


# --------------------------------------------------------------------------------------------
# Environment variables, read at import: run in fresh interpreters (all started at once)

_PROBE = """
import json, torch, fusedmtl, fusedmtl._C
from fusedmtl import backend
x = torch.randn(8, requires_grad=True)
loss = fusedmtl.mse_loss(x, torch.zeros(8))
print(json.dumps({"current": backend.current(), "cpu": backend.info()["selected"]["cpu"],
                  "grad_fn": loss.grad_fn.name(), "capability": fusedmtl._C.cpu_capability(),
                  "loss_ok": bool(torch.allclose(loss, (x * x).mean()))}))
"""

ENV_CASES = {
    "backend-auto": {"FUSEDMTL_BACKEND": "auto"},
    "backend-empty": {"FUSEDMTL_BACKEND": ""},
    "backend-native": {"FUSEDMTL_BACKEND": "native"},
    "backend-reference": {"FUSEDMTL_BACKEND": "reference"},
    "backend-invalid": {"FUSEDMTL_BACKEND": "fastest"},
    "capability-default": {"FUSEDMTL_CPU_CAPABILITY": "default"},
    "capability-avx2": {"FUSEDMTL_CPU_CAPABILITY": "avx2"},
}


@pytest.fixture(scope="module")
def env_runs():
    """Starts one interpreter per case concurrently; returns {case: CompletedProcess-like}."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FUSEDMTL_BACKEND", "FUSEDMTL_CPU_CAPABILITY")
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _PROBE],
            env={**base, **extra},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, extra in ENV_CASES.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr)
    return results


def _probe_result(env_runs, name):
    code, stdout, stderr = env_runs[name]
    assert code == 0, f"interpreter failed:\n{stderr[-2000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name, current, cpu",
    [
        ("backend-auto", "auto", "native"),
        ("backend-empty", "auto", "native"),
        ("backend-native", "native", "native"),
        ("backend-reference", "reference", "reference"),
    ],
)
def test_env_backend(env_runs, name, current, cpu):
    result = _probe_result(env_runs, name)
    assert result["current"] == current
    assert result["cpu"] == cpu
    assert result["loss_ok"]
    fused = "Fused" in result["grad_fn"] or "fusedmtl" in result["grad_fn"]
    assert fused == (cpu == "native"), result["grad_fn"]


def test_env_backend_invalid(env_runs):
    code, stdout, stderr = env_runs["backend-invalid"]
    assert code != 0, "importing fusedmtl with FUSEDMTL_BACKEND=fastest succeeded"
    assert "ValueError" in stderr
    assert "FUSEDMTL_BACKEND" in stderr and "fastest" in stderr


@pytest.mark.parametrize(
    "name, requested", [("capability-default", "default"), ("capability-avx2", "avx2")]
)
def test_env_cpu_capability(env_runs, name, requested, restore_cpu_capability):
    supported = fusedmtl._C.set_cpu_capability("avx512")  # the best this CPU has
    expected = CAPABILITIES[min(CAPABILITIES.index(requested), CAPABILITIES.index(supported))]
    assert _probe_result(env_runs, name)["capability"] == expected


# --------------------------------------------------------------------------------------------
# fusedmtl._C.cpu_capability / set_cpu_capability


def test_cpu_capability_is_known():
    assert fusedmtl._C.cpu_capability() in CAPABILITIES


@pytest.mark.parametrize("requested", CAPABILITIES)
def test_set_cpu_capability_returns_what_is_in_force(requested, restore_cpu_capability):
    supported = fusedmtl._C.set_cpu_capability("avx512")
    actual = fusedmtl._C.set_cpu_capability(requested)
    assert actual == fusedmtl._C.cpu_capability()
    # a request above what the CPU supports is lowered to it
    assert actual == CAPABILITIES[min(CAPABILITIES.index(requested), CAPABILITIES.index(supported))]


def test_set_cpu_capability_default_always_available(restore_cpu_capability):
    assert fusedmtl._C.set_cpu_capability("default") == "default"
    x, y = torch.randn(1000), torch.randn(1000)
    with backend.use("native"):
        assert torch.equal(
            fusedmtl.mse_loss(x, y, reduction="none"),
            torch.nn.functional.mse_loss(x, y, reduction="none"),
        )


@pytest.mark.parametrize("name", ["sse", "AVX2", "", "avx512 "])
def test_set_cpu_capability_unknown_name_changes_nothing(name, restore_cpu_capability):
    before = fusedmtl._C.set_cpu_capability("default")
    try:
        result = fusedmtl._C.set_cpu_capability(name)
    except ValueError:
        result = fusedmtl._C.cpu_capability()
    assert result == before == fusedmtl._C.cpu_capability()


@pytest.mark.parametrize("value", [None, 2, b"avx2"], ids=repr)
def test_set_cpu_capability_needs_a_string(value, restore_cpu_capability):
    before = fusedmtl._C.cpu_capability()
    with pytest.raises(TypeError):
        fusedmtl._C.set_cpu_capability(value)
    assert fusedmtl._C.cpu_capability() == before
