"""Adam, the trainer's optimiser, without ``torch.optim``.

``torch.optim.Adam`` imports ``torch._dynamo`` on its first ``step`` (its step is wrapped for
``torch.compile``): ~2 s of CPU in every process that trains, measured on the 2-core box
(``import torch._dynamo``: 2.1 s after ``import torch``: 2.5 s). A sweep starts one trainer process
per run, so a sweep of many short runs paid it per run. :class:`Adam` is the same algorithm with the
same arithmetic as torch's single-tensor path (the one torch takes for CPU tensors), in the same
``state_dict`` format, so checkpoints written with either load in the other:

    m_t = β₁ m_{t−1} + (1 − β₁) g_t                       (exp_avg.lerp_(g, 1 − β₁))
    v_t = β₂ v_{t−1} + (1 − β₂) g_t²
    θ_t = θ_{t−1} − lr / (1 − β₁ᵗ) · m_t / (√v_t / √(1 − β₂ᵗ) + ε)

No weight decay, amsgrad or maximize (the trainer uses none); ``tests/trainer/test_optim.py`` holds it
equal to ``torch.optim.Adam`` bit for bit on the CPU, state dict included.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

#: torch.optim.Adam's param-group defaults beside lr, betas and eps (kept so its state dicts match ours).
_GROUP_FLAGS = {"weight_decay": 0.0, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "fused": None, "decoupled_weight_decay": False}


class Adam:
    """Adam over ``params`` (one parameter group); ``param_groups[0]["lr"]`` may be changed between steps."""

    def __init__(self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        group = {"lr": lr, "betas": tuple(betas), "eps": eps, **_GROUP_FLAGS, "params": list(params)}
        self.param_groups: list[dict[str, Any]] = [group]
        self.state: dict[Tensor, dict[str, Tensor]] = {}

    @property
    def params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p in self.params:
            if p.grad is None:
                continue
            state = self.state.get(p)
            if state is None:
                state = self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            t = state["step"].item()
            step_size = lr / (1 - beta1**t)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format: per-parameter state by the parameter's index, the group with indices."""
        index = {id(p): i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.Adam`` over the same parameters (moments cast
        to each parameter's dtype and device, ``step`` kept on the CPU, as torch does)."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        by_index = dict(enumerate(self.params))
        state: dict[Tensor, dict[str, Tensor]] = {}
        for i, saved in state_dict["state"].items():
            p = by_index[int(i)]
            state[p] = {k: v if k == "step" else v.to(dtype=p.dtype, device=p.device) for k, v in saved.items()}
            if set(state[p]) != {"step", "exp_avg", "exp_avg_sq"} or state[p]["exp_avg"].shape != p.shape:
                raise ValueError(f"loaded state of parameter {i} does not fit it")
        group = copy.deepcopy({k: v for k, v in groups[0].items() if k != "params"})
        group["betas"] = tuple(group["betas"])
        self.param_groups = [{**group, "params": self.params}]
        self.state = state
