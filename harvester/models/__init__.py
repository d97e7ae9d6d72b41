"""Model adapters (one module per ``model.kind``; see :mod:`harvester.models.base`)."""

from harvester.models.base import (
    BLOCK_PATHS,
    Inspected,
    ModelAdapter,
    ModelInfo,
    ModelKind,
    StopForward,
    find_block_path,
    hub_offline,
    inspect_model,
    load_model,
    model_kind,
    model_kinds,
    pick_device,
    register_model,
    resolve_layer,
    transformer_blocks,
)
from harvester.models.hf_causal_lm import (
    PYPI_PREFIX,
    find_packaged_gguf,
    find_packaged_model,
    hf_load_error,
    resolve_hf_source,
)
from harvester.models.open_clip import open_clip_name

__all__ = ["BLOCK_PATHS", "Inspected", "ModelAdapter", "ModelInfo", "ModelKind", "StopForward", "find_block_path",
           "hub_offline", "inspect_model", "load_model", "model_kind", "model_kinds", "pick_device",
           "register_model", "resolve_layer", "transformer_blocks", "PYPI_PREFIX", "find_packaged_gguf",
           "find_packaged_model", "hf_load_error", "resolve_hf_source", "open_clip_name"]
