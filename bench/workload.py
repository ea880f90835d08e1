"""What the sweeps run on: ResNet-18's parameter shapes, random task gradients, the
flatten-and-concatenate idiom of the baselines, the loss kinds and the weighting methods."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch

import fusedmtl.weighting as weighting
from bench import peers

TaskGrads = list[list[torch.Tensor]]
RESNET18_TENSORS, RESNET18_ELEMENTS = 62, 11_689_512


def loss_functions() -> tuple[str, ...]:
    """The public functions of the regression-loss kinds (fusedmtl.<f> replaces
    torch.nn.functional.<f>), from the table fusedmtl.losses exports."""
    from fusedmtl.losses import REGRESSION_KINDS

    return tuple(kind.function for kind in REGRESSION_KINDS)


def resnet18_shapes(divisor: int = 1) -> list[tuple[int, ...]]:
    """torchvision's ResNet-18 parameter shapes (1000 classes) in module order: 62 tensors,
    11,689,512 elements; ``divisor`` > 1 divides every leading dimension (a small stand-in with
    the same tensor count, for tests).

    conv1 64x3x7x7 and bn1; four stages of two BasicBlocks (widths 64-512: conv 3x3, bn, conv 3x3,
    bn, and in the first block of stages 2-4 a 1x1 downsample conv and its bn); fc 1000x512 and
    its bias. Convolutions have no bias; BatchNorm contributes weight and bias.
    """
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            shapes += [(width, in_channels, 3, 3), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            if block == 0 and stage > 0:
                shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            in_channels = width
    shapes += [(1000, 512), (1000,)]
    assert len(shapes) == RESNET18_TENSORS
    assert sum(math.prod(s) for s in shapes) == RESNET18_ELEMENTS
    return shapes if divisor <= 1 else [(max(1, s[0] // divisor), *s[1:]) for s in shapes]


def make_task_grads(shapes: Sequence[tuple[int, ...]], k: int, device, seed: int = 0) -> TaskGrads:
    """K lists of N(0, 1) float32 gradients of the given shapes."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=generator).to(device) for s in shapes] for _ in range(k)]


def flatten_rows(task_grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """A fresh K x G matrix holding each task's flattened gradients in a row (cat(out=row): the
    cheapest form of the idiom)."""
    first = task_grads[0][0]
    flat = first.new_empty((len(task_grads), sum(t.numel() for t in task_grads[0])))
    for i, grads in enumerate(task_grads):
        torch.cat([t.reshape(-1) for t in grads], out=flat[i])
    return flat


def split_like(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    pieces = vector.split([t.numel() for t in like])
    return [piece.view_as(t) for piece, t in zip(pieces, like)]


def add_into_grad(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """p.grad += the piece of a G vector that belongs to p (creating .grad where it is None)."""
    with torch.no_grad():
        for p, piece in zip(params, split_like(vector, params)):
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.add_(piece)


def loss_values(k: int, device="cpu") -> torch.Tensor:
    """Detached task losses near 1 and all different (loss-dependent methods see distinct tasks)."""
    return torch.tensor([1.0 + 0.1 * i for i in range(k)], device=device)


LAST_LAYER_TENSORS = 2  # GradNorm's last shared layer: the last weight and bias


def all_methods() -> dict[str, type]:
    return {**weighting.GRADIENT_BASED, **weighting.LOSS_BASED}


def make_method(
    name: str, k: int, shared_params: Sequence[torch.Tensor] | None = None, **options
) -> weighting.Weighting:
    """A fresh, ready instance of a registered weighting method for K tasks: the class's own
    ``example`` where it has one, else its defaults plus what it cannot do without (GradNorm's
    last shared layer, PriorLoss's priors, a seed for random methods, so that two instances draw
    the same). ``options`` override (e.g. what makes it the method a peer implements)."""
    cls = all_methods()[name]
    if hasattr(cls, "example"):  # the registry's own way (its GradNorm layer: the last 2 here too)
        return cls.example(k, shared_params, **options)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {
        "last_shared_layer": list(shared_params or ())[-LAST_LAYER_TENSORS:],
        "priors": [1.0] * k,
        "seed": 0,
    }
    options = {key: v for key, v in defaults.items() if key in accepted} | options
    args = (list(shared_params), k) if name in weighting.GRADIENT_BASED else (k,)
    return cls(*args, **options)


def chosen_methods(text: str, family: dict) -> list[str]:
    """--methods: 'all' or names; names of the other family are left to the sweep that has them."""
    every = {**weighting.GRADIENT_BASED, **weighting.LOSS_BASED}
    names = list(every) if text.strip() == "all" else [m.strip() for m in text.split(",")]
    unknown = [m for m in names if m not in every]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {list(every)}")
    return [m for m in names if m in family]


def build(name: str, k: int, params) -> weighting.Weighting:
    """The method as every contender runs it: as torchjd implements it where torchjd has it."""
    return make_method(name, k, params, **peers.matching_options(name))


def gramian_columns(name: str, params) -> int | None:
    """GradNorm's Gramian covers only its last shared layer."""
    cls = weighting.GRADIENT_BASED[name]
    if "last_shared_layer" in inspect.signature(cls.__init__).parameters:
        return sum(p.numel() for p in params[-LAST_LAYER_TENSORS:])
    return None


def flatten_step(name: str, method, params, columns: int | None):
    """The weighting step written the flatten way, with ``method.coefficients``."""
    average = {"matrix": None, "steps": 0}

    def running_average(matrix: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """DB-MTL: rows g_i / (L_i + eps), lerped towards the previous matrix."""
        matrix.mul_((1.0 / (losses.double() + method.eps)).to(matrix.dtype)[:, None])
        if method.beta == 0:
            return matrix
        if average["matrix"] is None:
            average["matrix"] = torch.zeros_like(matrix)
        matrix.lerp_(
            average["matrix"], method.beta / float(average["steps"] + 1) ** method.beta_sigma
        )
        average["matrix"], average["steps"] = matrix, average["steps"] + 1
        return matrix

    # TrimmedMean, GradDrop, ExcessMTL, MoCo work on the gradients themselves (per coordinate):
    # the flatten way runs their own transform on the matrix's rows, one view per parameter
    transforms = name != "db_mtl" and (
        type(method)._task_table is not weighting.GradientWeighting._task_table
    )

    def step(task_grads, losses) -> torch.Tensor:
        matrix = flatten_rows(task_grads)
        if name == "db_mtl":
            matrix = running_average(matrix, losses)
        table = None
        if transforms:
            views = [split_like(row, params) for row in matrix]
            table, _ = method._task_table(views, losses, 1.0, False, True)
            pairs = [(t, v) for r, w in zip(table, views) for t, v in zip(r, w)]
            if any(t.data_ptr() != v.data_ptr() for t, v in pairs):
                matrix = flatten_rows(table)  # (each of them writes into the views it is given)
        part = matrix if columns is None else matrix[:, -columns:]
        coeffs = method.coefficients(part @ part.T, losses).to(matrix)
        if table is not None:
            method._commit(table)
        add_into_grad(coeffs @ matrix, params)
        return coeffs

    return step
