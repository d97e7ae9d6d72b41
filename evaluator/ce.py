"""Downstream cross-entropy with the SAE spliced into the residual stream (``docs/metrics.md``).

For eval contexts of T tokens, the model runs three times per batch:

* clean — unmodified;
* sae — the hooked activations at every position except 0 (BOS) replaced by
  ``reconstruct`` of them, in float32, cast back to the model's dtype;
* zero — the same positions replaced by zeros (the ablation baseline).

Losses are next-token cross-entropies (nats) averaged over the predictions made from
the spliced positions (position p = 1..T−2 predicting token p + 1); the prediction
made from position 0 is identical in all three runs and is left out so that it does
not dilute the differences. Reported:

    ce_degradation = ce_sae − ce_clean
    ce_recovered   = (ce_zero − ce_sae) / (ce_zero − ce_clean)
    kl             = mean_t Σ_v p_clean(v) (log p_clean(v) − log p_sae(v))

Sums over tokens are float64 (per-token sums over the vocabulary float32). An identity ``reconstruct`` gives bit-identical logits, hence
ce_degradation = 0 and kl = 0 exactly; a zero ``reconstruct`` gives ce_sae = ce_zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from evaluator.splice import Edit, rows_edit, splice, unwrap_model, zero_rows
from store.errors import UserError

FIRST_SCORED = 1  # first position whose next-token prediction is scored (position 0 is never spliced)


def _forward_logits(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """Logits (B, T, V) of an HF causal LM, without a KV cache."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _log_probs(logits: Tensor) -> Tensor:
    """log p over the vocabulary for the scored predictions (positions 1..T−2), float32."""
    return F.log_softmax(logits[:, FIRST_SCORED:-1].float(), dim=-1)


def _nll_sum(logp: Tensor, targets: Tensor) -> float:
    """Σ −log p(target) in float64."""
    return float(-logp.gather(-1, targets.unsqueeze(-1)).to(torch.float64).sum())


def _kl_sum(logp_clean: Tensor, logp_other: Tensor) -> float:
    """Σ_t Σ_v p_clean (log p_clean − log p_other): per-token sums in float32 (no float64 copy of the
    (B, T, V) logits), the sum over tokens in float64."""
    per_token = (logp_clean.exp() * (logp_clean - logp_other)).sum(-1)
    return float(per_token.to(torch.float64).sum())


def splice_ce(model: Any, input_ids: Tensor, layer: int, site: str, reconstruct: Edit, *,
              batch_size: int = 8, skip_positions: Sequence[int] = (0,), progress: bool = True) -> dict[str, Any]:
    """CE of ``model`` on ``input_ids`` (N, T) clean, with ``reconstruct`` spliced at (layer, site), and zeroed.

    ``reconstruct`` maps float32 hooked activations (n, d) to their reconstruction (n, d).
    Returns ce_clean, ce_sae, ce_zero, ce_degradation, ce_recovered, kl, kl_zero, tokens, contexts.
    """
    net = unwrap_model(model)
    if input_ids.ndim != 2 or input_ids.shape[1] < FIRST_SCORED + 2:
        raise UserError(f"CE needs contexts of at least {FIRST_SCORED + 2} tokens as an (N, T) tensor; "
                        f"got shape {tuple(input_ids.shape)}.")
    if 0 not in skip_positions:
        skip_positions = (0, *skip_positions)
    device = next(net.parameters()).device
    sae_edit, zero_edit = rows_edit(reconstruct, skip_positions), rows_edit(zero_rows, skip_positions)
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    tokens = 0
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            bar = tqdm(range(0, input_ids.shape[0], batch_size), desc="ce", unit="batch", disable=not progress)
            for start in bar:
                ids = input_ids[start:start + batch_size].to(device=device, dtype=torch.long)
                targets = ids[:, FIRST_SCORED + 1:]
                logp_clean = _log_probs(_forward_logits(net, ids))
                with splice(net, layer, site, sae_edit):
                    logp_sae = _log_probs(_forward_logits(net, ids))
                with splice(net, layer, site, zero_edit):
                    logp_zero = _log_probs(_forward_logits(net, ids))
                sums["clean"] += _nll_sum(logp_clean, targets)
                sums["sae"] += _nll_sum(logp_sae, targets)
                sums["zero"] += _nll_sum(logp_zero, targets)
                sums["kl"] += _kl_sum(logp_clean, logp_sae)
                sums["kl_zero"] += _kl_sum(logp_clean, logp_zero)
                tokens += targets.numel()
                bar.set_postfix(tokens=tokens)
    finally:
        net.train(was_training)
    ce_clean, ce_sae, ce_zero = (sums[k] / tokens for k in ("clean", "sae", "zero"))
    gap = ce_zero - ce_clean
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "ce_degradation": ce_sae - ce_clean,
        "ce_recovered": (ce_zero - ce_sae) / gap if gap != 0 else math.nan,
        "kl": sums["kl"] / tokens,
        "kl_zero": sums["kl_zero"] / tokens,
        "tokens": tokens,
        "contexts": int(input_ids.shape[0]),
        "layer": layer,
        "site": site,
        "skip_positions": sorted(set(skip_positions)),
    }
