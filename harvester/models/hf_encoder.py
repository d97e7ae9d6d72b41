"""``hf_encoder``: a Hugging Face encoder (BERT, MiniLM) run as ``AutoModel``; otherwise as ``hf_causal_lm``."""

from __future__ import annotations

from typing import Any

from harvester.models.base import register_model
from harvester.models.hf_causal_lm import HFCausalLM, HFEncoderAdapter


@register_model
class HFEncoder(HFCausalLM):
    kind = "hf_encoder"
    adapter = HFEncoderAdapter

    @classmethod
    def auto_class(cls) -> Any:
        from transformers import AutoModel

        return AutoModel
