"""trainer.optim.Adam is torch.optim.Adam's algorithm, arithmetic and state-dict format (on the CPU, bit for
bit), without torch.optim's import of torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import torch

from trainer.optim import Adam


def params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_(),
            torch.randn(3, 7, generator=g).requires_grad_()]


def loss(ps: list[torch.Tensor], step: int) -> torch.Tensor:
    """A small autoencoder loss; the third parameter takes part on odd steps only (no grad on even ones)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(11, 7, generator=g)
    h = torch.relu(x @ ps[0] + ps[1])
    extra = (ps[2] ** 2).sum() if step % 2 else 0.0
    return ((h @ ps[0].T - x) ** 2).mean() + extra


def train(opt_cls, ps, steps, lrs, start=0, opt=None):
    opt = opt or opt_cls(ps, lr=lrs[0], betas=(0.9, 0.99), eps=1e-6)
    for step in range(start, start + steps):
        opt.param_groups[0]["lr"] = lrs[step]
        opt.zero_grad(set_to_none=True)
        loss(ps, step).backward()
        opt.step()
    return opt


LRS = [1e-2, 3e-3, 1e-2, 5e-3, 2e-3, 1e-3, 1e-2, 1e-2, 4e-3, 1e-3]


def test_steps_equal_torch_adam_bit_for_bit():
    ours, theirs = params(0), params(0)
    a = train(Adam, ours, 10, LRS)
    b = train(torch.optim.Adam, theirs, 10, LRS)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() == {0, 1, 2}
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]) and sa["state"][i][k].dtype == sb["state"][i][k].dtype


def test_state_dicts_load_both_ways_and_resume_exactly():
    straight = params(1)
    train(Adam, straight, 10, LRS)
    for first, second in ((torch.optim.Adam, Adam), (Adam, torch.optim.Adam), (Adam, Adam)):
        ps = params(1)
        saved = train(first, ps, 4, LRS).state_dict()
        resumed = params(1)
        with torch.no_grad():
            for p, q in zip(resumed, ps):
                p.copy_(q)
        opt = second(resumed, lr=0.5)  # lr, betas and eps come from the state dict
        opt.load_state_dict(saved)
        train(second, resumed, 6, LRS, start=4, opt=opt)
        for p, q in zip(resumed, straight):
            assert torch.equal(p, q), (first, second)


def test_a_state_dict_of_other_parameters_is_refused():
    import pytest

    saved = train(Adam, params(2), 2, LRS).state_dict()
    with pytest.raises(ValueError, match="different number"):
        Adam(params(2)[:2], lr=1e-3).load_state_dict(saved)
    other = [torch.zeros(2, 2, requires_grad=True), *params(2)[1:]]
    with pytest.raises(ValueError, match="does not fit"):
        Adam(other, lr=1e-3).load_state_dict(saved)


def test_training_steps_do_not_import_dynamo():
    code = ("import sys, torch; from trainer.optim import Adam; p = torch.ones(3, requires_grad=True); "
            "o = Adam([p], lr=0.1); (p ** 2).sum().backward(); o.step(); o.load_state_dict(o.state_dict()); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
