"""GradNorm: learned task weights that balance gradient norms (Chen et al. 2018)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from fusedmtl import multi_tensor
from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.state import BufferOptimizer, adam


class GradNorm(GradientWeighting):
    """Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018.

    d = sum_i w_i g_i with learnable weights w (starting at 1). On the last shared layer W:
    G_i = w_i norm(grad_W L_i), r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)) with L_i(0) the
    first step's losses, target_i = sg(mean_j G_j * r_i^alpha), L_grad = sum_i abs(G_i - target_i).
    Its gradient has the closed form dL_grad/dw_i = sign(G_i - target_i) norm(grad_W L_i), so no
    double backward is needed. After d is computed with the current w, the weight optimizer takes
    one step on that gradient, then w is clamped positive and renormalised so sum w = K.

    Args:
        shared_params, tasks, **kwargs: see :class:`GradientWeighting`.
        last_shared_layer: the parameters of W (a module or an iterable of tensors; each must be
            one of the shared parameters). In representation mode the features play W's part.
        alpha: the restoring-force strength (the paper uses 0.12 to 3; 1.5 by default).
        weight_optimizer: a factory, params -> torch.optim.Optimizer, for the weights; default
            Adam with lr 0.025 (torch's fused Adam: no host read). Its state is part of this
            module's state_dict.

    ``coefficients(gramian, losses)`` takes the Gramian of the gradients with respect to W (only
    its diagonal is read) and the losses, returns the current w and updates w.
    """

    _host_state = True  # (see GradientWeighting._coefficients_or_passthrough)

    needs_full_gramian = False

    def __init__(
        self,
        shared_params,
        tasks,
        *,
        last_shared_layer: nn.Module | Iterable[Tensor],
        alpha: float = 1.5,
        weight_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        layer = list(
            last_shared_layer.parameters()
            if isinstance(last_shared_layer, nn.Module)
            else last_shared_layer
        )
        index = {id(p): i for i, p in enumerate(self._shared)}
        if not layer or any(id(p) not in index for p in layer):
            raise ValueError(
                "GradNorm: last_shared_layer must be a non-empty subset of the shared parameters"
            )
        self._layer_columns = [index[id(p)] for p in layer]
        self.alpha = float(alpha)
        k = self.num_tasks
        self.register_buffer("task_weights", torch.ones(k))
        self.register_buffer("initial_losses", torch.full((k,), float("nan")))
        self._optimizer = BufferOptimizer(
            self,
            "task_weights",
            weight_optimizer or adam(lr=0.025),
        )

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        # W: the last weight matrix of the shared parameters and what follows it (its bias),
        # the last layer of a trunk listed in order (trunk.parameters()).
        if not shared_params:
            return {}
        matrices = [i for i, p in enumerate(shared_params) if p.dim() >= 2]
        return {"last_shared_layer": shared_params[matrices[-1] if matrices else -1 :]}

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        if losses is None:
            raise ValueError("GradNorm needs the losses")
        weights = self.task_weights
        layer_norms = gramian.diagonal().clamp_min(0).sqrt().to(weights)
        losses = losses.detach().to(weights)
        # the first step's losses (a mask, not a host read)
        self.initial_losses.copy_(
            torch.where(self.initial_losses.isnan(), losses, self.initial_losses)
        )
        current = weights.clone()
        weighted_norms = weights * layer_norms
        ratios = losses / (self.initial_losses + self.eps)
        inverse_rate = ratios / ratios.mean()
        targets = weighted_norms.mean() * inverse_rate.pow(self.alpha)
        self._optimizer.step(torch.sign(weighted_norms - targets) * layer_norms)
        with torch.no_grad():
            weights.clamp_(min=self.eps)
            weights.mul_(self.num_tasks / weights.sum())
        return current.to(gramian.dtype)

    def _gramian(self, shared, representation: bool = False) -> Tensor:
        columns = (
            shared if representation else [[row[p] for p in self._layer_columns] for row in shared]
        )
        return torch.diag_embed(multi_tensor.gramian(columns, diagonal_only=True))

    def _not_in_gramian(self, table, representation: bool) -> list[Tensor]:
        if representation:  # (the Gramian is of all the features)
            return []
        layer = set(self._layer_columns)
        return [g for row in table for p, g in enumerate(row) if p not in layer and g is not None]

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "optimizer": self._optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._optimizer.load_state_dict(state["optimizer"])
