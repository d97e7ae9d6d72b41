"""``dynsae export RUN_URL OUT_DIR --format saelens|sparsify``: a run as a folder the field's tools read.

Formats (``docs/interop.md``):

* ``saelens`` — ``cfg.json`` + ``sae_weights.safetensors``, loaded by ``sae_lens.SAE.load_from_disk``
  (sae-lens ≥ 6.54) and so by SAE-Dashboard, SAEBench and Neuronpedia. relu → ``standard``,
  topk → ``topk``, jumprelu → ``jumprelu``, gated → ``gated``, batchtopk → ``jumprelu`` with its
  global inference threshold on every latent (SAELens's own inference form of BatchTopK),
  attn_relu → ``standard`` (see below); sparsemax and mlp_sparsemax → ``dynsae_sparsemax``, which
  SAELens knows after ``import dynsae.saelens``.
* ``sparsify`` — ``cfg.json`` + ``sae.safetensors`` for ``sparsify.SparseCoder.load_from_disk``
  (eai-sparsify 1.3), topk runs only.

Folding (the exported forward computes what ours computes, with no per-call extra work):

* The activation scale s (``input_scale``: our SAE encodes u = x/s and returns s·x̂) is folded into
  the weights and the folder says ``normalize_activations: "none"``. For the positively homogeneous
  codes (relu, topk, jumprelu, gated, batchtopk) the fold scales the *features* by c = s:
  b_enc·c, b_dec·c, thresholds·c, b_mag·c, W_enc and W_dec unchanged — so a unit-norm TopK decoder
  stays unit-norm, which is what SAE-Dashboard's norm folding needs (we mark it with
  ``rescale_acts_by_decoder_norm: true``, a no-op on unit rows). Sparsemax codes are not homogeneous,
  so mlp_sparsemax folds the encoder side instead (W_enc/s, W_dec·s, b_dec·s).
* Per-token norm (``SAE.unit_input``: x/‖x‖ in, ×‖x‖ out). A linear variant trained that way
  becomes SAELens's ``normalize_activations: "constant_norm_rescale"`` (SAELens encodes
  x·√d/‖x‖ and multiplies its output by ‖x‖/√d), with c = √d in the fold above — a stock
  architecture that needs nothing of ours. Decision: exported, not refused; the one caveat is
  SAELens's own — with that setting ``decode`` must follow an ``encode`` of the same rows.
* The cross-attention family folds to a plain dictionary: W_enc = (C W_K)ᵀ on x/‖x‖,
  W_dec = C W_V, zero biases, features ‖x‖·a, so the decode is linear and stateless. ReLU is
  homogeneous, so attn_relu is exactly a ``standard`` SAE: ‖x‖·ReLU((x/‖x‖) W_enc) = ReLU(x W_enc)
  (it needs no module of ours); sparsemax uses ``dynsae_sparsemax`` with ``scale_by_input_norm``.

``cfg.json`` metadata comes from the run's dataset manifest: ``model_name``, ``hook_name`` (the
TransformerLens name ``blocks.L.hook_resid_pre``/``hook_resid_post`` for HF causal LMs, whose
residual stream TransformerLens names that way; the project's hook name otherwise, and always under
``dynsae_hook_name``), ``context_size``, ``prepend_bos`` (read from the data: every context starts
with the same token), ``dataset_path`` (the dataset URL), ``sae_lens_version``, and the run's
training settings (``training_architecture``, ``training_architecture_details`` = our SAE config,
``dynsae_run`` = the run config). A directory holding a bare ``sae.save()`` (no dataset) exports
with the dataset fields left out.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from store import io
from store.cli import CommandHelp, command_parser
from store.config import add_storage_options_argument
from store.errors import UserError, run_cli
from trainer.run_format import FOREIGN_CONFIG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, RunConfig, read_run_config

FORMATS = ("saelens", "sparsify")
HELP = CommandHelp(
    does="Write a trained SAE as a folder other tools load: SAELens (every variant; SAE-Dashboard, SAEBench "
         "and Neuronpedia read it) or sparsify (TopK SAEs). The export computes what the trained SAE computes.",
    reads="a run folder (or a folder written by SAE.save) and the dataset its config names, for metadata",
    writes="OUT_DIR: cfg.json and the weights in the chosen library's names",
    example="runs/sweep1/variant-topk_m-4096 exported/topk-4096 --format saelens")
SAELENS_CFG = SPARSIFY_CFG = FOREIGN_CONFIG
MIN_SAELENS_VERSION = "6.54.0"
#: Variants whose codes are positively homogeneous in the pre-activations (the feature-scaling fold).
HOMOGENEOUS = ("relu", "topk", "jumprelu", "gated", "batchtopk")
UNIT_NORM_TOL = 1e-4  # |‖W_dec,i‖ − 1| below this counts as a unit-norm decoder


@dataclass
class Folded:
    """An SAE in SAELens terms: architecture, its extra cfg keys, weights (SAELens names), normalisation."""

    architecture: str
    tensors: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    normalize_activations: str = "none"


# ---- folding ---------------------------------------------------------------------------------


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64).cpu()


def fold_saelens(sae: Any) -> Folded:
    """The SAELens form of one of our SAEs (module docstring); computed in float64, stored float32."""
    cfg = sae.config
    variant = cfg.variant
    if variant in HOMOGENEOUS:
        folded = _fold_homogeneous(sae)
    elif variant == "attn_relu":
        folded = Folded("standard", _cross_attention_dictionary(sae))
    elif variant == "sparsemax":
        folded = Folded("dynsae_sparsemax", _cross_attention_dictionary(sae),
                        {"activation": cfg.activation, "scale_by_input_norm": True})
    elif variant == "mlp_sparsemax":
        folded = _fold_mlp_sparsemax(sae)
    else:
        raise UserError(f"SAE variant {variant!r} has no SAELens export; the exportable variants are relu, "
                        "topk, jumprelu, gated, batchtopk, attn_relu, sparsemax and mlp_sparsemax.")
    folded.tensors = {k: v.to(torch.float32).contiguous() for k, v in folded.tensors.items()}
    return folded


def _norm_factor(sae: Any) -> tuple[float, str]:
    """(c, normalize_activations): SAELens feeds the encoder c·u where our encoder sees u."""
    if sae.unit_input:
        return math.sqrt(sae.config.d), "constant_norm_rescale"  # SAELens: x·√d/‖x‖ in, ×‖x‖/√d out
    return float(sae.config.input_scale), "none"  # SAELens: x = s·u


def _fold_homogeneous(sae: Any) -> Folded:
    """relu/topk/jumprelu/gated/batchtopk: features ×c (c·π is what SAELens computes on c·u)."""
    c, normalize = _norm_factor(sae)
    variant = sae.config.variant
    w_dec = _f64(sae.decoder.weight)
    tensors = {"W_enc": _f64(sae.W_enc).T, "W_dec": w_dec, "b_dec": c * _f64(sae.b_dec)}
    b_enc = c * _f64(sae.b_enc)
    extra: dict[str, Any] = {}
    if variant == "relu":
        architecture = "standard"
        tensors["b_enc"] = b_enc
    elif variant == "topk":
        architecture = "topk"
        tensors["b_enc"] = b_enc
        unit = bool((w_dec.norm(dim=-1) - 1).abs().max() < UNIT_NORM_TOL)
        extra = {"k": int(min(sae.config.k, sae.config.m)), "rescale_acts_by_decoder_norm": unit}
    elif variant == "jumprelu":
        architecture = "jumprelu"
        tensors.update(b_enc=b_enc, threshold=c * _f64(sae.thresholds()))  # θ, not log θ
    elif variant == "batchtopk":
        architecture = "jumprelu"  # eval mode: f = π·1[π > θ] with one global θ
        theta = float(sae.threshold) if bool(sae.threshold_set) else 0.0
        tensors.update(b_enc=b_enc, threshold=torch.full((sae.config.m,), c * theta, dtype=torch.float64))
    else:  # gated: π_gate = h + b_gate, π_mag = exp(r_mag) ⊙ h + b_mag
        architecture = "gated"
        tensors.update(b_gate=b_enc, b_mag=c * _f64(sae.b_mag), r_mag=_f64(sae.r_mag))
    return Folded(architecture, tensors, extra, normalize)


def _cross_attention_dictionary(sae: Any) -> dict[str, Tensor]:
    """W_enc = (C W_K)ᵀ (d, M), W_dec = C W_V (M, d), zero biases (the scale s cancels on x/‖x‖)."""
    c = _f64(sae.C)
    d, m = sae.config.d, sae.config.m
    return {"W_enc": (c @ _f64(sae.W_K)).T, "W_dec": c @ _f64(sae.W_V),
            "b_enc": torch.zeros(m, dtype=torch.float64), "b_dec": torch.zeros(d, dtype=torch.float64)}


def _fold_mlp_sparsemax(sae: Any) -> Folded:
    """Sparsemax needs π itself: W_enc/c on the c·u SAELens feeds, W_dec·c, b_dec·c, b_enc as is."""
    c, normalize = _norm_factor(sae)
    tensors = {"W_enc": _f64(sae.W_enc).T / c, "W_dec": c * _f64(sae.decoder.weight),
               "b_dec": c * _f64(sae.b_dec), "b_enc": _f64(sae.b_enc)}
    return Folded("dynsae_sparsemax", tensors, {"activation": sae.config.activation,
                                                "scale_by_input_norm": False}, normalize)


# ---- metadata ----------------------------------------------------------------------------------


def saelens_version() -> str:
    """The installed sae-lens version (≥ 6 keeps SAELens from rebuilding the metadata), else the minimum."""
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return MIN_SAELENS_VERSION


def transformer_lens_hook(manifest: Any) -> str | None:
    """``blocks.L.hook_resid_pre``/``_post`` for HF causal LMs (TransformerLens names their residual
    stream that way: resid_pre L = input of block L, as ours); None for other model kinds."""
    if manifest.model.kind != "hf_causal_lm":
        return None
    return f"blocks.{manifest.hook.layer}.hook_{manifest.hook.site}"


def project_hook(manifest: Any) -> str:
    """The harvester's hook name (``blocks.L.input``/``output``), or ``<site> of block L``."""
    return manifest.hook.name or f"{manifest.hook.site} of block {manifest.hook.layer}"


def prepends_bos(dataset: Any, rows: int = 8192) -> bool:
    """True when the stored contexts start with one common token (≥ 2 contexts seen): the harvester
    prepends BOS where the model has one. Datasets without token ids (vision) give False."""
    import numpy as np

    arrays = dataset.arrays
    if "token_ids" not in arrays or "positions" not in arrays:
        return False
    n = min(rows, int(dataset.manifest.rows or 0))
    first = np.asarray(arrays["token_ids"][:n])[np.asarray(arrays["positions"][:n]) == 0]
    return bool(first.size >= 2 and (first == first[0]).all())


def saelens_metadata(run_cfg: RunConfig | None, sae: Any, storage_options: io.StorageOptions) -> dict[str, Any]:
    """The ``metadata`` section of cfg.json (module docstring)."""
    meta: dict[str, Any] = {
        "sae_lens_version": saelens_version(),
        "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": {},
        "training_architecture": f"dynsae_{sae.config.variant}",
        "training_architecture_details": sae.config.model_dump(mode="json"),
        "dynsae_unit_input": bool(sae.unit_input),
    }
    if run_cfg is not None:
        meta["dynsae_run"] = run_cfg.model_dump(mode="json", exclude={"sae"})
    dataset_url = run_cfg.dataset if run_cfg is not None else None
    if not dataset_url:
        return meta
    from store import open_dataset

    dataset = open_dataset(dataset_url, storage_options=storage_options)
    man = dataset.manifest
    tl_hook = transformer_lens_hook(man)
    meta.update({
        "model_name": man.model.name,
        "hook_name": tl_hook or project_hook(man),
        "dynsae_hook_name": project_hook(man),
        "hook_layer": man.hook.layer,
        "context_size": man.context_length,
        "prepend_bos": prepends_bos(dataset),
        "dataset_path": dataset_url,
        "dynsae_dataset_manifest_hash": man.manifest_hash(),
    })
    if tl_hook is not None:
        meta["model_class_name"] = "HookedTransformer"
    if man.model.revision:
        meta["model_from_pretrained_kwargs"] = {"revision": man.model.revision}
    return meta


# ---- writing -----------------------------------------------------------------------------------


def load_run(run_url: str, storage_options: io.StorageOptions = None) -> tuple[Any, RunConfig | None]:
    """(our SAE in eval mode, the run config; None for an SAE saved on its own)."""
    from trainer.sae import load

    sae = load(run_url, storage_options).eval()
    return sae, read_run_config(run_url, storage_options)


def export_saelens(run_url: str, out_url: str, storage_options: io.StorageOptions = None) -> str:
    """Write ``<out>/cfg.json`` + ``<out>/sae_weights.safetensors``; returns ``out_url``."""
    sae, run_cfg = load_run(run_url, storage_options)
    folded = fold_saelens(sae)
    cfg = {"architecture": folded.architecture, "d_in": sae.config.d, "d_sae": sae.config.m,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": folded.normalize_activations, "reshape_activations": "none",
           **folded.extra, "metadata": saelens_metadata(run_cfg, sae, storage_options)}
    io.save_safetensors(io.join_url(out_url, SAELENS_WEIGHTS), folded.tensors, storage_options)
    io.write_json(io.join_url(out_url, SAELENS_CFG), cfg, storage_options)
    return out_url


def export_sparsify(run_url: str, out_url: str, storage_options: io.StorageOptions = None) -> str:
    """Write ``<out>/cfg.json`` + ``<out>/sae.safetensors`` (sparsify's SparseCoder) for a topk run."""
    sae, _ = load_run(run_url, storage_options)
    variant = sae.config.variant
    if variant != "topk":
        raise UserError(f"run {run_url} is a {variant} SAE; sparsify holds TopK SAEs only, so export it with "
                        "--format saelens (every variant goes there) or export a topk run to sparsify.")
    if sae.unit_input:
        raise UserError(f"run {run_url} is a topk SAE trained with input_norm 'unit' (x/‖x‖ in, ×‖x‖ out), "
                        "which sparsify cannot express; export it with --format saelens instead.")
    folded = _fold_homogeneous(sae)
    t = folded.tensors
    tensors = {"encoder.weight": t["W_enc"].T, "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    unit = bool(folded.extra["rescale_acts_by_decoder_norm"])
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.config.m // sae.config.d),
           "normalize_decoder": unit, "num_latents": sae.config.m, "k": int(folded.extra["k"]),
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.config.d}
    io.save_safetensors(io.join_url(out_url, SPARSIFY_WEIGHTS),
                        {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, storage_options)
    io.write_json(io.join_url(out_url, SPARSIFY_CFG), cfg, storage_options)
    return out_url


def export(run_url: str, out_url: str, fmt: str = "saelens", storage_options: io.StorageOptions = None) -> str:
    """Export a run (or a saved SAE directory) to ``out_url`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not known; choose one of {', '.join(FORMATS)}.")
    writer = export_saelens if fmt == "saelens" else export_sparsify
    return writer(run_url, out_url, storage_options)


# ---- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m dynsae.export", HELP)
    parser.add_argument("run", metavar="RUN_URL", help="run directory (or a directory written by SAE.save), any fsspec URL")
    parser.add_argument("out", metavar="OUT_DIR", help="folder to write, any fsspec URL")
    parser.add_argument("--format", default="saelens", choices=FORMATS,
                        help="saelens (every variant; SAE-Dashboard, SAEBench, Neuronpedia) or sparsify (topk)")
    add_storage_options_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = export(args.run, args.out, args.format, args.storage_options)
    if args.format == "sparsify":
        how = "sparsify.SparseCoder.load_from_disk"
    else:
        arch = (io.read_json(io.join_url(out, SAELENS_CFG), args.storage_options) or {}).get("architecture")
        how = ("`import dynsae.saelens`, then sae_lens.SAE.load_from_disk" if str(arch).startswith("dynsae")
               else "sae_lens.SAE.load_from_disk")
    print(f"wrote {args.format} folder {out} (load it with {how})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
