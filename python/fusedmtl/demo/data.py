"""The demo's generated multi-task problem: a known ground truth, no download.

Ground truth (every draw from one ``torch.Generator`` seeded by ``seed``, so the data set is a
pure function of its arguments):

    x ~ N(0, I_d)                                   inputs, d = 16 by default
    u = tanh(1.5 x A / sqrt(d))                     A: d x 8, standard normal
    h = tanh(u B / sqrt(8)) + 0.5 u                 B: 8 x 8; h is the shared nonlinear latent

Every task is a function of h only, so a shared trunk that learns h helps all of them. The tasks
differ in scale, in noise and in kind (b, b' ~ N(0, I / 8); c a random direction of norm 1.5):

``energy`` (regression, large scale, Gaussian noise)
    y = 100 (h b + 0.5 (h b')^2) + 10 e,  e ~ N(0, 1). Labels have a standard deviation of about
    60 and an L2 loss in the thousands at initialisation: left alone it dominates any unweighted
    sum of losses. Trained with L2 (mse_loss).

``sensor`` (regression, unit scale, heavy-tailed outliers in the training labels)
    y = 2 sin(h c) + 0.2 e,  and in a fraction ``outlier_rate`` (20 %) of the *training* samples a
    faulty-sensor glitch adds 3 |t_3| (Student-t with 3 degrees of freedom: heavy tails, mean
    3 * 1.10 = 3.3 per glitch). Test labels are clean. The glitches only ever read high, so the
    conditional *mean* of the training labels (what L2 estimates) is biased upwards by about
    0.2 * 3.3 = 0.66 everywhere, while the conditional *median* (what L1 estimates) moves only to
    the 0.5 / 0.8 = 62.5 % quantile of the 0.2-sd clean noise, about +0.06; smooth-L1 with beta =
    0.25 (about the clean noise scale) behaves like L1 on the glitches (bounded gradient) and
    lands next to the median. On top of the bias, the infinite-kurtosis glitches make the L2
    gradient noisy. So L1 and smooth-L1 beat L2 on the clean test MAE by a wide margin: that is
    the extra comparison the demo prints.

``class`` (classification, 4 classes, label noise)
    y = argmax(h C) with C (8 x 4) standard normal; 10 % of the training labels are replaced by a
    uniformly drawn class. Test labels are the noise-free argmax. Cross-entropy, accuracy.

Test labels are the noise-free ground truth for every task, so the test metrics measure how well
the function was recovered (the irreducible label noise does not enter them): the best possible
test RMSE is 0, the best accuracy 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

LATENT = 8


@dataclass(frozen=True)
class Task:
    """One task of the problem: its name, kind, output width and default training loss."""

    name: str
    kind: str  # 'regression' or 'classification'
    out_dim: int
    loss: str  # 'mse', 'l1', 'smooth_l1' or 'cross_entropy'
    description: str


@dataclass
class Problem:
    """Training and test sets of every task. ``y_train[name]`` / ``y_test[name]``: (N, 1) float
    for regression, (N,) int64 class indices for classification."""

    x_train: Tensor
    x_test: Tensor
    y_train: dict[str, Tensor]
    y_test: dict[str, Tensor]
    tasks: list[Task]
    info: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def in_dim(self) -> int:
        return self.x_train.shape[1]


def make_problem(
    n_train: int = 8192,
    n_test: int = 4096,
    dim: int = 16,
    seed: int = 0,
    outlier_rate: float = 0.2,
    classes: int = 4,
    label_noise: float = 0.1,
) -> Problem:
    """The generated problem (see the module docstring), deterministic in its arguments."""
    gen = torch.Generator().manual_seed(int(seed))

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    A, B = randn(dim, LATENT), randn(LATENT, LATENT)
    b, b2, c = (
        randn(LATENT, 1) / math.sqrt(LATENT),
        randn(LATENT, 1) / math.sqrt(LATENT),
        randn(LATENT, 1),
    )
    c = c / c.norm() * 1.5
    C = randn(LATENT, classes)

    def latent(x: Tensor) -> Tensor:
        u = torch.tanh(1.5 * x @ A / math.sqrt(dim))
        return torch.tanh(u @ B / math.sqrt(LATENT)) + 0.5 * u

    def clean(x: Tensor) -> dict[str, Tensor]:
        h = latent(x)
        return {
            "energy": 100.0 * (h @ b + 0.5 * (h @ b2).square()),
            "sensor": 2.0 * torch.sin(h @ c),
            "class": (h @ C).argmax(1),
        }

    x_train, x_test = randn(n_train, dim), randn(n_test, dim)
    y_train, y_test = clean(x_train), clean(x_test)

    # Training-label noise, task by task (test labels stay clean).
    y_train["energy"] = y_train["energy"] + 10.0 * randn(n_train, 1)
    glitch = torch.rand(n_train, 1, generator=gen, dtype=torch.float64) < outlier_rate
    student_t3 = randn(n_train, 1) / torch.sqrt(_chi2(3, (n_train, 1), gen) / 3.0)
    y_train["sensor"] = (
        y_train["sensor"] + 0.2 * randn(n_train, 1) + glitch * 3.0 * student_t3.abs()
    )
    flip = torch.rand(n_train, generator=gen, dtype=torch.float64) < label_noise
    random_class = torch.randint(classes, (n_train,), generator=gen)
    y_train["class"] = torch.where(flip, random_class, y_train["class"])

    tasks = [
        Task("energy", "regression", 1, "mse", "large scale (sd ~60), Gaussian noise sd 10"),
        Task(
            "sensor",
            "regression",
            1,
            "smooth_l1",
            f"unit scale, {outlier_rate:.0%} one-sided Student-t(3) glitches in training labels",
        ),
        Task(
            "class",
            "classification",
            classes,
            "cross_entropy",
            f"{classes} classes, {label_noise:.0%} training labels flipped",
        ),
    ]

    def to32(y: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.float() if v.is_floating_point() else v.long() for k, v in y.items()}

    info = {
        "n_train": n_train,
        "n_test": n_test,
        "dim": dim,
        "latent": LATENT,
        "seed": int(seed),
        "outlier_rate": outlier_rate,
        "classes": classes,
        "label_noise": label_noise,
        "train_label_sd": {
            k: float(v.double().std()) for k, v in y_train.items() if v.is_floating_point()
        },
        "glitch_fraction": float(glitch.double().mean()),
    }
    return Problem(x_train.float(), x_test.float(), to32(y_train), to32(y_test), tasks, info)


def _chi2(df: int, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Chi-squared draws with an integer number of degrees of freedom, from the generator."""
    return torch.randn(df, *shape, generator=gen, dtype=torch.float64).square().sum(0)
