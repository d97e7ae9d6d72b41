"""Model adapters: where the transformer blocks live, and which block a hook names.

This first part holds the pieces other packages need (the evaluator splices SAEs
into the residual stream with them):

* :func:`transformer_blocks` finds the ``nn.ModuleList`` of residual blocks of a
  GPT-2 (``transformer.h``), a Llama-family model (``model.layers``, also inside a
  ``*ForCausalLM`` wrapper), a BERT/MiniLM encoder (``encoder.layer``) or an
  open_clip ViT (``visual.transformer.resblocks``).
* :func:`resolve_layer` turns a configured layer (negative counts from the end,
  as in Python indexing) into a block index, or raises a one-sentence
  :class:`store.errors.UserError` naming the model, the layer and the valid range.

Hook sites: ``resid_pre`` at layer L is the input of block L (``hidden_states[L]``
in transformers' convention), ``resid_post`` at layer L is the output of block L
(``hidden_states[L + 1]``).
"""

from __future__ import annotations

from torch import nn

from store.errors import UserError

# Attribute paths (dotted) of the block list, tried in order. Wrapped forms
# (``*ForCausalLM`` -> ``model.layers``) come before the bare base models.
BLOCK_PATHS: tuple[str, ...] = (
    "transformer.h",                    # GPT2LMHeadModel
    "h",                                # GPT2Model
    "model.layers",                     # LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM ...
    "layers",                           # LlamaModel
    "encoder.layer",                    # BertModel / MiniLM
    "bert.encoder.layer",               # Bert*For* heads
    "visual.transformer.resblocks",     # open_clip CLIP
    "transformer.resblocks",            # open_clip VisionTransformer used on its own
)


def _get_path(obj: object, path: str) -> object | None:
    """``obj.a.b.c`` for ``path="a.b.c"``, or None if any attribute is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_block_path(model: nn.Module) -> str | None:
    """The dotted attribute path of the model's block list, or None if none of :data:`BLOCK_PATHS` fits."""
    for path in BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path
    return None


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of residual blocks of ``model`` (GPT-2, Llama family, BERT/MiniLM, open_clip ViT)."""
    inner = getattr(model, "model", None)
    if not isinstance(model, nn.Module) and isinstance(inner, nn.Module):
        model = inner  # a ModelAdapter: look inside it
    path = find_block_path(model)
    if path is None:
        raise UserError(
            f"cannot find the transformer blocks of {type(model).__name__} (looked for "
            f"{', '.join(BLOCK_PATHS)}); use a GPT-2, Llama-family, BERT/MiniLM or open_clip ViT model."
        )
    blocks = _get_path(model, path)
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def resolve_layer(n_layers: int, layer: int, model_name: str = "the model") -> int:
    """Block index for ``layer`` in a model with ``n_layers`` blocks (negative counts from the end).

    Valid layers are ``-n_layers .. n_layers - 1``; anything else is a :class:`UserError`.
    """
    if n_layers <= 0:
        raise UserError(f"{model_name} has no transformer blocks; choose a transformer model.")
    if not -n_layers <= layer < n_layers:
        raise UserError(
            f"layer {layer} is out of range for {model_name}, which has {n_layers} blocks; "
            f"choose a layer from {-n_layers} to {n_layers - 1} (negative counts from the end)."
        )
    return layer % n_layers
