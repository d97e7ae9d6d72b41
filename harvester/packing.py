"""Documents -> fixed-length token contexts (every text source feeds this).

:func:`pack_contexts` turns documents into fixed-length contexts: tokenize, join the documents
with the separator (end-of-text) token, cut into pieces of ``context_length`` (minus one when the
model has a BOS token) and put BOS first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from store.errors import UserError

T = TypeVar("T")

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
    for ids, _ in tagged_token_stream(((doc, None) for doc in documents), tokenizer, spec):
        yield ids


def tagged_token_stream(documents: Iterable[tuple[str, T]], tokenizer: Any,
                        spec: TokenSpec) -> Iterator[tuple[np.ndarray, T]]:
    """``(token ids + separator, tag)`` of each ``(text, tag)`` document with text (batched tokenizer
    calls); blank or token-less documents are skipped with their tag."""
    batch: list[tuple[str, T]] = []

    def flush() -> Iterator[tuple[np.ndarray, T]]:
        encoded = tokenizer([text for text, _ in batch], add_special_tokens=False)["input_ids"]
        for ids, (_, tag) in zip(encoded, batch, strict=True):
            if ids:
                yield np.asarray([*ids, spec.sep_id], dtype=np.int64), tag
        batch.clear()

    for doc in documents:
        if doc[0].strip():
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
    body = body_length(context_length, bos_id)
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
            yield with_bos(ctx, bos_id)
            made += 1
            if max_contexts is not None and made >= max_contexts:
                return


def body_length(context_length: int, bos_id: int | None) -> int:
    """Tokens of text per context: ``context_length``, less one for BOS when the model has one."""
    return context_length - (1 if bos_id is not None else 0)


def with_bos(piece: np.ndarray, bos_id: int | None) -> np.ndarray:
    """``[BOS] + piece`` (int64) when the model has a BOS token, else a copy of ``piece``."""
    return np.concatenate([[bos_id], piece]).astype(np.int64) if bos_id is not None else piece.astype(np.int64)


def pack_documents(documents: Iterable[tuple[np.ndarray, tuple[int, int]]], context_length: int,
                   bos_id: int | None, max_contexts: int | None = None) -> Iterator[tuple[np.ndarray, int, int]]:
    """``(context, label, doc_id)`` from ``(token ids, (label, doc_id))`` documents, never two
    documents in one context: document tokens ``[i*b, (i+1)*b)`` for ``i < len // b`` (``b`` =
    :func:`body_length`), BOS first; the shorter tail is dropped (see the module docstring)."""
    body = body_length(context_length, bos_id)
    made = 0
    for ids, (label, doc_id) in documents:
        for start in range(0, len(ids) - body + 1, body):
            yield with_bos(ids[start:start + body], bos_id), label, doc_id
            made += 1
            if max_contexts is not None and made >= max_contexts:
                return
