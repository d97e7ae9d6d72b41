"""Model adapters: one module per model kind, found by discovery; the generic pieces live here.

Each module of this package that defines a model kind subclasses :class:`ModelKind` (its
``kind`` string, ``modality``, the optional :class:`harvester.config.ModelConfig` fields it uses,
how to :meth:`ModelKind.load` the model and how to :meth:`ModelKind.inspect` it cheaply on the
driver) and registers it with :func:`register_model`. :func:`model_kinds` imports every module of
the package (``pkgutil``), so a new file here is a new ``model.kind`` with nothing else edited.

Pieces other packages need (the evaluator splices SAEs into the residual stream with them):

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

import contextlib
import importlib
import os
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
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


# ------------------------------------------------------------------------------ loading


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StopForward(Exception):
    """Raised by the hook to stop the forward pass right after the hooked block."""


def hub_offline() -> bool:
    """True when Hugging Face downloads are disabled."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@dataclass
class ModelInfo:
    """What the driver needs before any work starts: depth, width and the text/image interface."""

    name: str
    kind: str
    n_layers: int
    d: int
    max_positions: int | None = None  # text models
    tokens_per_image: int | None = None  # vision models


class ModelAdapter:
    """A loaded model with one interface: :meth:`capture` the residual stream at a hook site.

    Attributes: ``model`` (the ``nn.Module``), ``info`` (:class:`ModelInfo`), ``tokenizer``
    (text models) or ``preprocess`` (vision models), ``device``.
    """

    def __init__(self, model: nn.Module, info: ModelInfo, device: torch.device,
                 tokenizer: Any = None, preprocess: Any = None) -> None:
        self.model = model.eval()
        self.info = info
        self.device = device
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @property
    def blocks(self) -> nn.ModuleList:
        return transformer_blocks(self.model)

    def resolve(self, layer: int) -> int:
        return resolve_layer(len(self.blocks), layer, self.info.name)

    def forward(self, inputs: torch.Tensor) -> None:
        """Run the model on token ids (B, T) or images (B, 3, H, W); outputs are not needed."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def batch_first(self, hidden: torch.Tensor) -> torch.Tensor:
        """The captured hidden state as (B, T, d) (a kind that runs (T, B, d) transposes here)."""
        return hidden

    @torch.inference_mode()
    def capture(self, inputs: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        """Residual stream (B, T, d) at ``site`` of block ``layer``; the pass stops after that block.

        resid_pre = the block's input, resid_post = its output (transformers 5 blocks return a
        bare tensor, older ones a tuple whose first item is the hidden state).
        """
        block = self.blocks[self.resolve(layer)]
        captured: dict[str, torch.Tensor] = {}

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["x"] = args[0] if args else next(v for k, v in kwargs.items()
                                                      if k in ("hidden_states", "x", "q_x"))
            raise StopForward

        def post_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            captured["x"] = output[0] if isinstance(output, (tuple, list)) else output
            raise StopForward

        handle = (block.register_forward_pre_hook(pre_hook, with_kwargs=True) if site == "resid_pre"
                  else block.register_forward_hook(post_hook))
        try:
            with contextlib.suppress(StopForward):
                self.forward(inputs.to(self.device))
        finally:
            handle.remove()
        if "x" not in captured:
            raise RuntimeError(f"the hook on block {layer} of {self.info.name} never ran")
        return self.batch_first(captured["x"])


def pick_device(device: str | None) -> torch.device:
    """The configured device, else cuda when visible, else cpu."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """The configured compute dtype; always float32 on CPU (half precision there is far slower)."""
    return torch.float32 if device.type == "cpu" else TORCH_DTYPES[cfg.dtype]




# ----------------------------------------------------------------------------- registry

OPTIONAL_FIELDS = ("gguf_file", "pretrained", "revision")  # ModelConfig fields not every kind uses


@dataclass
class Inspected:
    """The driver's view of the model: its info, and the tokenizer of a text model."""

    info: ModelInfo
    tokenizer: Any = None


class ModelKind:
    """One model kind: what it reads, which optional config fields it uses, how it loads.

    Subclasses set ``kind``, ``modality`` and ``fields`` (a subset of :data:`OPTIONAL_FIELDS`)
    and implement :meth:`load`; :meth:`inspect` defaults to loading the model on CPU.
    """

    kind: ClassVar[str]
    modality: ClassVar[Literal["text", "image"]] = "text"
    fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def load(cls, cfg: Any, device: torch.device) -> ModelAdapter:
        raise NotImplementedError

    @classmethod
    def inspect(cls, cfg: Any) -> Inspected:
        """Depth, width (and tokenizer) before any worker starts; override to load less than the model."""
        adapter = cls.load(cfg, torch.device("cpu"))
        return Inspected(adapter.info, adapter.tokenizer)


_REGISTRY: dict[str, type[ModelKind]] = {}
_SEARCHED: list[bool] = []  # non-empty once every module of the package has been imported


def register_model(cls: type[ModelKind]) -> type[ModelKind]:
    """Class decorator: register a model kind under ``cls.kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def model_kinds() -> dict[str, type[ModelKind]]:
    """kind -> adapter class of every model module in :mod:`harvester.models` (imported on first use)."""
    if not _SEARCHED:  # the package imports some kind modules itself; the others are not in yet
        _discover()
    return dict(_REGISTRY)


def _discover() -> None:
    """Import every module of this module's package (found by discovery: no module of the package is
    named here, so none imports this one back); each registers the kinds it defines."""
    for module in pkgutil.iter_modules([os.path.dirname(__file__)]):
        importlib.import_module(f"{__package__}.{module.name}")
    _SEARCHED.append(True)


def model_kind(kind: str) -> type[ModelKind]:
    """The adapter class of ``kind`` (the package is searched again for a kind not seen yet)."""
    if kind not in model_kinds():
        importlib.invalidate_caches()
        _discover()
    if kind not in _REGISTRY:
        raise UserError(f"model.kind {kind!r} is not a model kind; use one of {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[kind]


def load_model(cfg: Any, device: str | torch.device | None = None) -> ModelAdapter:
    """Load the configured model on ``device`` (default: cuda if visible, else cpu), in eval mode."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return model_kind(cfg.kind).load(cfg, dev)


def inspect_model(cfg: Any) -> Inspected:
    """The driver's view of the configured model, loading as little as the kind allows."""
    return model_kind(cfg.kind).inspect(cfg)
