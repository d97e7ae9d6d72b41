"""Variant name → SAE class; :func:`build` from a config, :func:`load` from a saved directory or run."""

from __future__ import annotations

from typing import Any

from store import io
from store.config import validate
from store.errors import UserError
from trainer.sae.attn_relu import AttnReluSAE
from trainer.sae.base import CONFIG_FILE, SAE
from trainer.sae.batchtopk import BatchTopKSAE
from trainer.sae.config import SAEConfig
from trainer.sae.gated import GatedSAE
from trainer.sae.jumprelu import JumpReluSAE
from trainer.sae.mlp_sparsemax import MLPSparsemaxSAE
from trainer.sae.relu import ReluSAE
from trainer.sae.sparsemax import SparsemaxSAE
from trainer.sae.topk import TopKSAE

VARIANTS: dict[str, type[SAE]] = {
    cls.variant: cls
    for cls in (SparsemaxSAE, ReluSAE, GatedSAE, JumpReluSAE, TopKSAE, BatchTopKSAE, AttnReluSAE, MLPSparsemaxSAE)
}


def as_config(cfg: SAEConfig | dict[str, Any], source: str = "SAE config") -> SAEConfig:
    """Validate a dict (one :class:`UserError` sentence on failure) or pass a config through."""
    if isinstance(cfg, SAEConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise UserError(f"{source} must be a mapping of SAE settings, not {type(cfg).__name__}.")
    return validate(SAEConfig, cfg, source=source)


def build(cfg: SAEConfig | dict[str, Any]) -> SAE:
    """A freshly initialised SAE of ``cfg.variant`` (seeded by ``cfg.seed``)."""
    config = as_config(cfg)
    return VARIANTS[config.variant](config)


def load(url: str, storage_options: io.StorageOptions = None) -> SAE:
    """Restore an SAE from a directory (local path or fsspec URL) holding config.json + sae.safetensors.

    config.json may be the SAE config itself (written by ``sae.save``) or a trainer run config, whose
    ``"sae"`` key holds the SAE config.
    """
    path = io.join_url(url, CONFIG_FILE)
    data = io.read_json_object(path, storage_options, what="the SAE or run config")
    if data is None:
        raise UserError(f"{path} does not exist; point at a directory written by sae.save() or a trainer run.")
    sae_data = data["sae"] if "sae" in data else data
    sae = build(as_config(sae_data, source=path))
    sae.load_weights(url, storage_options)
    return sae
