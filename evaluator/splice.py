"""Splicing an edit into a transformer's residual stream at a hook site (shared by CE and zero-shot).

``resid_pre`` at layer L is the input of block L (a forward *pre*-hook replaces it);
``resid_post`` at layer L is the output of block L (a forward hook replaces it). Blocks
are found with :func:`harvester.models.transformer_blocks`. A block's output may be a
bare tensor (transformers 5, open_clip) or a tuple whose first element is the hidden
state (older transformers); both are handled. The hidden state handed to ``edit`` is
always (B, T, d): open_clip stacks built with ``batch_first=False`` run (T, B, d), and
:func:`splice` transposes around the edit for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from harvester.models import resolve_layer, transformer_blocks
from store.errors import UserError

SITES = ("resid_pre", "resid_post")
HIDDEN_KWARGS = ("hidden_states", "q_x", "x")  # names blocks give their residual input

Edit = Callable[[Tensor], Tensor]


def unwrap_model(model: Any) -> nn.Module:
    """The ``nn.Module`` itself when given a harvester ``ModelAdapter`` (anything with ``.model``)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise UserError(f"{type(model).__name__} is not a torch model; pass an nn.Module or a harvester ModelAdapter.")


def hook_block(model: Any, layer: int) -> nn.Module:
    """Block ``layer`` (negative counts from the end) of ``model``."""
    blocks = transformer_blocks(unwrap_model(model))
    return blocks[resolve_layer(len(blocks), layer, type(unwrap_model(model)).__name__)]


def _check_site(site: str) -> None:
    if site not in SITES:
        raise UserError(f"hook site {site!r} is not supported; use one of {', '.join(SITES)}.")


def _batch_first_edit(edit: Edit, seq_first: bool) -> Edit:
    if not seq_first:
        return edit
    return lambda h: edit(h.transpose(0, 1)).transpose(0, 1)


@contextmanager
def splice(model: Any, layer: int, site: str, edit: Edit, seq_first: bool = False) -> Iterator[None]:
    """Within the ``with`` block, the residual stream at (layer, site) is replaced by ``edit(h)``."""
    _check_site(site)
    block = hook_block(model, layer)
    fn = _batch_first_edit(edit, seq_first)

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        for name in HIDDEN_KWARGS:
            if name in kwargs:
                return args, {**kwargs, name: fn(kwargs[name])}
        raise RuntimeError(f"{type(_module).__name__} was called without a hidden-state argument")

    def post_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, Tensor):
            return fn(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (fn(output[0]), *output[1:])
        raise RuntimeError(f"{type(_module).__name__} returned {type(output).__name__}, not a tensor or tuple")

    if site == "resid_pre":
        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = block.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


def rows_edit(reconstruct: Edit, skip_positions: Sequence[int] = (0,)) -> Edit:
    """An edit that replaces every position except ``skip_positions`` by ``reconstruct`` of it.

    ``reconstruct`` maps float32 rows (n, d) to their reconstruction (n, d); the result is
    cast back to the stream's dtype. Positions in ``skip_positions`` pass through unchanged.
    """

    def edit(h: Tensor) -> Tensor:
        b, t, d = h.shape
        keep = torch.ones(t, dtype=torch.bool, device=h.device)
        skip = [p for p in skip_positions if -t <= p < t]
        keep[skip] = False
        out = h.clone()
        rows = h[:, keep].reshape(-1, d).to(torch.float32)
        out[:, keep] = reconstruct(rows).reshape(b, -1, d).to(h.dtype)
        return out

    return edit


def zero_rows(rows: Tensor) -> Tensor:
    """The zero reconstruction (ablation baseline)."""
    return torch.zeros_like(rows)
