"""Documents -> fixed-length token contexts (every text source feeds this).

:func:`pack_contexts` turns documents into fixed-length contexts: tokenize, join the documents
with the separator (end-of-text) token, cut into pieces of ``context_length`` (minus one when the
model has a BOS token) and put BOS first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.errors import UserError

TOKENIZE_BATCH = 64  # documents per tokenizer call


@dataclass(frozen=True)
class TokenSpec:
    """What packing needs from a tokenizer: the BOS id (or None) and the separator id."""

    bos_id: int | None
    sep_id: int


def token_spec(tokenizer: Any, model_name: str) -> TokenSpec:
    """BOS = ``bos_token`` (else ``cls_token``); separator = ``eos_token`` (else ``sep_token``, else BOS)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    sep = tokenizer.eos_token_id
    if sep is None:
        sep = tokenizer.sep_token_id
    if sep is None:
        sep = bos
    if sep is None:
        raise UserError(f"the tokenizer of {model_name} has no end-of-text, separator or BOS token to join "
                        f"documents with; use a tokenizer that defines eos_token.")
    return TokenSpec(bos_id=None if bos is None else int(bos), sep_id=int(sep))


def token_stream(documents: Iterable[str], tokenizer: Any, spec: TokenSpec) -> Iterator[np.ndarray]:
    """Token ids of each document followed by the separator (batched tokenizer calls)."""
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if ids:
                yield np.asarray([*ids, spec.sep_id], dtype=np.int64)
        batch.clear()

    for doc in documents:
        if doc.strip():
            batch.append(doc)
        if len(batch) >= TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def pack_contexts(pieces: Iterable[np.ndarray], context_length: int, bos_id: int | None,
                  max_contexts: int | None = None) -> Iterator[np.ndarray]:
    """Fixed-length contexts from a token stream; the incomplete tail is dropped.

    Each context is ``[BOS] + stream[i*b:(i+1)*b]`` with ``b = context_length - 1`` when the
    model has a BOS token, else ``stream[i*b:(i+1)*b]`` with ``b = context_length``.
    """
    body = context_length - (1 if bos_id is not None else 0)
    buffer: list[np.ndarray] = []
    held = 0
    made = 0
    for piece in pieces:
        buffer.append(piece)
        held += len(piece)
        while held >= body:
            flat = np.concatenate(buffer)
            ctx, rest = flat[:body], flat[body:]
            buffer, held = [rest], len(rest)
            yield np.concatenate([[bos_id], ctx]).astype(np.int64) if bos_id is not None else ctx.copy()
            made += 1
            if max_contexts is not None and made >= max_contexts:
                return
