"""torch.library.opcheck on every loss schema of every backend, driven by one list of samples
(pytorch/extension-cpp's way): schema, fake (meta) kernel, autograd registration, and
torch.compile's view of each op. The compiled backend's ops are fusedmtl::regression_loss*,
fusedmtl::heteroscedastic_loss*; the Triton backend's are their fusedmtl::triton_* twins.

On every device: on CUDA the same schemas with their CUDA kernels (the native ones registered
for the CUDA dispatch key, the Triton ones launched on the GPU), with one gradient combination per
sample there: what opcheck checks of the flags (which gradients the fake and the kernel return)
does not depend on the device, and the native CPU samples take every combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fusedmtl
from tests.helpers import (
    DEVICES,
    REDUCTIONS,
    LossCase,
    assert_bitwise,
    backends_on,
    make_pair,
    skip_without_a_gpu,
)

# The Triton schemas are sampled (and registered) where Triton runs on some device under test.
TRITON_SAMPLED = any("triton" in backends_on(d) for d in DEVICES)
if TRITON_SAMPLED:
    from fusedmtl.losses import triton as _triton  # noqa: F401  (registers the triton ops)

# (kind, param) of each family: every kind, plus smooth-L1 with a beta the kernels divide by.
REGRESSION_PARAMS = [
    ("l1", 0.0),
    ("mse", 0.0),
    ("smooth_l1", 1.0),
    ("smooth_l1", 2.5),
    ("huber", 0.5),
]
HETEROSCEDASTIC_PARAMS = [("l2", 1.0), ("l1", 1.0), ("smooth_l1", 1.0), ("smooth_l1", 2.5)]
GRAD_FLAGS = [(True, True), (True, False), (False, True)]
# The schemas, by backend: the loss ops, their backward ops and (native only) the ops that compute
# the gradients in forward and the eager fast path's op.
SCHEMAS = {
    "native": (
        "regression_loss",
        "regression_loss_backward",
        "regression_loss_with_grad",
        "regression_loss_eager",
        "heteroscedastic_loss",
        "heteroscedastic_loss_backward",
        "heteroscedastic_loss_with_grad",
    ),
    "triton": (
        "triton_regression_loss",
        "triton_regression_loss_backward",
        "triton_heteroscedastic_loss",
        "triton_heteroscedastic_loss_backward",
    ),
}


@dataclass(frozen=True)
class Sample:
    op: str  # name in torch.ops.fusedmtl
    kind: str
    param: float
    reduction: int
    flags: tuple[bool, bool] | None = None  # the two "gradient wanted" arguments, if any

    @property
    def id(self) -> str:
        flags = "" if self.flags is None else "-" + "".join("TF"[not f] for f in self.flags)
        return f"{self.op}-{self.kind}{self.param:g}-r{self.reduction}{flags}"

    def args(self, device: str = "cpu") -> tuple:
        heteroscedastic = "heteroscedastic" in self.op
        backward = self.op.endswith("_backward")
        x, y = make_pair((5, 7), torch.float32, seed=11)
        operands = [x, y]
        if heteroscedastic:
            operands.append(torch.randn(5, 7, generator=torch.Generator().manual_seed(3)))
        operands = [t.to(device) for t in operands]
        if not backward and not self.op.endswith("_with_grad"):
            for t in operands:  # the loss ops are differentiable: opcheck checks their autograd
                t.requires_grad_()
        config = (self.kind, self.param, self.reduction)
        flags = () if self.flags is None else self.flags
        if backward:
            grad_output = torch.randn(x.shape if self.reduction == 0 else ()).to(device)
            return (grad_output, *operands, *config, *flags)
        return (*operands, *config, *flags)


def samples(backend: str, one_flag_set: bool = False) -> list[Sample]:
    out = []
    for op in SCHEMAS[backend]:
        params = HETEROSCEDASTIC_PARAMS if "heteroscedastic" in op else REGRESSION_PARAMS
        reduced_only = op.endswith(("_with_grad", "_eager"))
        has_flags = op.endswith(("_with_grad", "_backward"))
        for kind, param in params:
            for reduction in (1, 2) if reduced_only else (0, 1, 2):
                # Triton under the interpreter is slow: one gradient combination per sample there
                one = one_flag_set or backend != "native"
                flag_sets = GRAD_FLAGS[reduction : reduction + 1] if one else GRAD_FLAGS
                for flags in flag_sets if has_flags else (None,):
                    out.append(Sample(op, kind, param, reduction, flags))
    return out


SAMPLES = [
    pytest.param(s, d, id=f"{d}-{s.id}")
    for d in DEVICES
    for b in backends_on(d)
    if b in SCHEMAS
    for s in samples(b, one_flag_set=d != "cpu")
]


@pytest.mark.parametrize("sample, device", SAMPLES)
def test_opcheck(sample, device):
    skip_without_a_gpu(device)
    torch.library.opcheck(getattr(torch.ops.fusedmtl, sample.op).default, sample.args(device))


def test_every_schema_is_checked():
    """Every loss schema the extension and the Triton module register has samples above."""
    registered = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("fusedmtl::") and "loss" in name
    }
    sampled = {s.op for b in SCHEMAS for s in samples(b)}
    expected = set(SCHEMAS["native"]) | (set(SCHEMAS["triton"]) if TRITON_SAMPLED else set())
    assert registered == expected
    assert sampled >= registered


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("kind, param", REGRESSION_PARAMS)
def test_ops_match_functional(kind, param, reduction):
    """The raw ops compute what the functional losses compute (and what torch computes)."""
    x, y = make_pair((5, 7), torch.float32, seed=11)
    case = LossCase(kind, None if kind in ("l1", "mse") else param)
    name = REDUCTIONS[reduction]
    loss = torch.ops.fusedmtl.regression_loss(x, y, kind, param, reduction)
    with fusedmtl.backend.use("native"), torch.no_grad():
        assert_bitwise(loss, case.fused(x, y, name), "op vs functional")
    if reduction:
        loss2, gx, gy = torch.ops.fusedmtl.regression_loss_with_grad(
            x, y, kind, param, reduction, True, True
        )
        assert_bitwise(loss2, loss, "regression_loss_with_grad loss")
        one = torch.ones(())
        bx, by = torch.ops.fusedmtl.regression_loss_backward(
            one, x, y, kind, param, reduction, True, True
        )
        assert_bitwise(bx, gx, "backward vs with_grad")
        assert_bitwise(by, gy, "backward vs with_grad")
