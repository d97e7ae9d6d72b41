"""Fixtures of the SAE zoo tests: synthetic data with a known ground-truth dictionary."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


class SparseDictionaryData:
    """x = Σ_{i∈A} c_i g_i + noise: ``active`` random atoms of a unit-norm dictionary G (m_true, d),
    non-negative coefficients c_i ~ U(0.5, 1.5), Gaussian noise of std ``noise``."""

    def __init__(self, d: int = 64, m_true: int = 128, active: int = 4, noise: float = 0.01, seed: int = 1):
        self.gen = torch.Generator().manual_seed(seed)
        g = torch.randn(m_true, d, generator=self.gen)
        self.dictionary = g / g.norm(dim=-1, keepdim=True)
        self.d, self.m_true, self.active, self.noise = d, m_true, active, noise

    def batch(self, b: int) -> Tensor:
        """A fresh batch (b, d)."""
        idx = torch.rand(b, self.m_true, generator=self.gen).topk(self.active, dim=-1).indices
        coef = 0.5 + torch.rand(b, self.active, generator=self.gen)
        x = (coef[..., None] * self.dictionary[idx]).sum(1)
        return x + self.noise * torch.randn(b, self.d, generator=self.gen)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − μ‖²."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.fixture
def dictionary_data() -> type[SparseDictionaryData]:
    """The synthetic data class (tests instantiate it with their own sizes)."""
    return SparseDictionaryData


@pytest.fixture(name="fvu")
def fvu_fixture():
    """The fraction of variance unexplained Σ‖x − x̂‖² / Σ‖x − μ‖²."""
    return fvu
