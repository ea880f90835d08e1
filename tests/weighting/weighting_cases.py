"""What the weighting tests share: one shared-trunk model, its batches and losses, the methods
built from the registries (``fusedmtl.weighting.LOSS_BASED`` / ``GRADIENT_BASED``, each through
its ``example``), and the float64 helpers the oracles use.

Every contract and property test parametrizes over ``LOSS_NAMES`` / ``GRADIENT_NAMES``, so a method
added to a registry is tested like the others without editing a list here.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from torch import nn

from fusedmtl import weighting as W

K = 3
EPS = 1e-8
GRAD_MODES = ("loop", "batched")
LOSS_NAMES = tuple(W.LOSS_BASED)
GRADIENT_NAMES = tuple(W.GRADIENT_BASED)
METHODS = {**W.LOSS_BASED, **W.GRADIENT_BASED}
METHOD_NAMES = tuple(METHODS)


class SharedTrunkNet(nn.Module):
    """A shared trunk (Linear, Tanh, Linear, Tanh) and one linear head per task; built from
    ``seed`` without disturbing the global random state."""

    def __init__(
        self,
        seed: int = 0,
        dtype=torch.float64,
        in_dim: int = 4,
        hidden: int = 8,
        feat: int = 6,
        out_dims=(1, 1, 3),
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.trunk = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, feat), nn.Tanh()
            )
            self.heads = nn.ModuleList(nn.Linear(feat, d) for d in out_dims)
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


def make_batch(seed: int = 0, n: int = 16, dtype=torch.float64, device="cpu"):
    """Inputs for the default SharedTrunkNet and its three targets: a unit-scale regression, one
    about 50 times larger, a 3-class label."""
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 4, generator=gen, dtype=dtype)
    y0 = torch.sin(x[:, :1] + 0.5 * x[:, 1:2]) + 0.1 * torch.randn(n, 1, generator=gen, dtype=dtype)
    y1 = 50.0 * (x[:, 2:3] - x[:, 3:4]) + torch.randn(n, 1, generator=gen, dtype=dtype)
    y2 = torch.randint(0, 3, (n,), generator=gen)
    return x.to(device), (y0.to(device), y1.to(device), y2.to(device))


def losses_from_outputs(outputs, targets):
    (o0, o1, o2), (y0, y1, y2) = outputs, targets
    return [F.mse_loss(o0, y0), F.mse_loss(o1, y1), F.cross_entropy(o2, y2)]


def model_losses(model, batch, features: bool = False):
    x, targets = batch
    z, outputs = model(x)
    losses = losses_from_outputs(outputs, targets)
    return (losses, z) if features else losses


def build(name: str, model: SharedTrunkNet | None = None, tasks=K, **overrides) -> W.Weighting:
    """The registered method ``name`` through its ``example`` (the model's trunk as the shared
    parameters)."""
    return METHODS[name].example(tasks, model.shared if model is not None else None, **overrides)


def is_gradient_based(name: str) -> bool:
    return name in W.GRADIENT_BASED


def run_backward(weighting, losses, **kwargs):
    """weighting.backward for either family (loss-based methods take no features)."""
    return weighting.backward(losses, **kwargs)


# -- float64 helpers ----------------------------------------------------------------------------


def task_grads64(losses, params) -> torch.Tensor:
    """K x N float64 matrix: row i is d L_i / d params, flattened (zeros where there is no path)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1).double()
                    for p, g in zip(params, grads)
                ]
            )
        )
    return torch.stack(rows)


def head_grads64(model, losses) -> list[torch.Tensor]:
    """Head i's gradient (flattened, float64) of its own loss only."""
    return [
        task_grads64([loss], list(head.parameters()))[0] for loss, head in zip(losses, model.heads)
    ]


def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def _as64(x):
    return (
        x.detach().double().cpu()
        if isinstance(x, torch.Tensor)
        else torch.tensor(x, dtype=torch.float64)
    )


def assert_close64(actual, expected, rtol=1e-10, atol=1e-12, what=""):
    __tracebackhide__ = True
    torch.testing.assert_close(
        _as64(actual), _as64(expected), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def leaf_losses(values, dtype=torch.float64):
    return [torch.tensor(float(v), dtype=dtype, requires_grad=True) for v in values]


def values64(losses):
    return torch.tensor([float(loss) for loss in losses], dtype=torch.float64)


def snapshot(module) -> bytes:
    """The module's state_dict, serialised: equal bytes, equal state."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def loss_sequence(steps: int, seed: int = 0) -> list[list[float]]:
    """K = 3 positive losses of different scales and rates of decrease, with noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor([1.0, 30.0, 2.0], dtype=torch.float64)
    decay = torch.tensor([0.9, 0.6, 0.97], dtype=torch.float64)
    return [
        (base * decay**t * (1 + 0.1 * torch.rand(K, generator=gen, dtype=torch.float64))).tolist()
        for t in range(steps)
    ]


# -- explicit Jacobians, for step(task_grads, losses) ------------------------------------------

SHAPES = [(3, 4), (5,), (2, 2)]  # 21 elements over 3 parameters
N = sum(math.prod(s) for s in SHAPES)


def jacobian_params(dtype=torch.float64, device="cpu") -> list[torch.Tensor]:
    """Zero parameters of SHAPES, the shared parameters of the step() tests."""
    return [torch.zeros(s, dtype=dtype, device=device, requires_grad=True) for s in SHAPES]


def split_rows(jacobian: torch.Tensor) -> list[list[torch.Tensor]]:
    """The K x N Jacobian's rows as per-parameter gradients of SHAPES (what step() takes)."""
    rows = []
    for row in jacobian:
        pieces, offset = [], 0
        for s in SHAPES:
            pieces.append(row[offset : offset + math.prod(s)].reshape(s).clone())
            offset += math.prod(s)
        rows.append(pieces)
    return rows


def make_jacobian(k: int, seed: int, conflicting: bool = False) -> torch.Tensor:
    """K x N task gradients with norms spread over two decades; ``conflicting``: every later task
    pulls against the first."""
    g = torch.Generator().manual_seed(seed)
    jacobian = (
        torch.randn(k, N, generator=g, dtype=torch.float64)
        * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    )
    if conflicting:
        jacobian[1:] -= (
            1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
        )
    return jacobian


def step_update(weighting, jacobian, losses=None):
    """(d that weighting.step wrote into .grad as a flat vector, the coefficients); the
    weighting's shared parameters must be fresh jacobian_params()."""
    coeffs = weighting.step(split_rows(jacobian), losses)
    return torch.cat([p.grad.reshape(-1) for p in weighting._shared]), coeffs


def transformed_losses(losses, scales, shifts):
    """a_i L_i + b_i: the losses under a positive scale and a shift per task."""
    return [a * loss + b for loss, a, b in zip(losses, scales, shifts)]
