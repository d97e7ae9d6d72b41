"""``dynsae export RUN_URL OUT_DIR --format saelens|sparsify``: a run as a folder the field's tools read.

Formats (``docs/interop.md``):

* ``saelens`` — ``cfg.json`` + ``sae_weights.safetensors``, loaded by ``sae_lens.SAE.load_from_disk``
  (sae-lens ≥ 6.54) and so by SAE-Dashboard, SAEBench and Neuronpedia. relu → ``standard``,
  topk → ``topk``, jumprelu → ``jumprelu``, gated → ``gated``, batchtopk → ``jumprelu`` with its
  global inference threshold on every latent (SAELens's own inference form of BatchTopK),
  attn_relu → ``standard`` (see below); sparsemax and mlp_sparsemax → ``dynsae_sparsemax``, which
  SAELens knows after ``import dynsae.saelens``.
  matryoshka → ``jumprelu`` like batchtopk (its prefixes matter only in training).
* ``sparsify`` — ``cfg.json`` + ``sae.safetensors`` for ``sparsify.SparseCoder.load_from_disk``
  (eai-sparsify 1.3), topk runs only.

Each variant converts itself: ``to_saelens()`` / ``to_sparsify()`` in its own file
``trainer/sae/<name>.py`` return plain float64 tensors and cfg keys (:mod:`trainer.sae.interop`), or
raise ``NotRepresentable`` with the reason, which this command reports in one sentence naming the
formats that can hold the run. This module writes the folders and the metadata; it knows no variant.

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
import sys
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


# ---- the variant's own conversion ---------------------------------------------------------------


def _float32(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The stored form of converted weights (the conversions compute in float64)."""
    return {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}


def convert(sae: Any, fmt: str, run_url: str) -> Any:
    """The variant's own conversion to ``fmt`` (``to_saelens`` / ``to_sparsify`` in its file); a format
    that cannot express it is one :class:`UserError` sentence with the variant's reason and the formats
    that can."""
    from trainer.sae.interop import NotRepresentable

    try:
        return getattr(sae, f"to_{fmt}")()
    except NotRepresentable as err:
        reason = str(err).rstrip(".")
    others = [f for f in FORMATS if f != fmt and representable(sae, f)]
    hint = f"export it with --format {' or --format '.join(others)} instead" if others else \
        "no export format can hold it"
    raise UserError(f"run {run_url} (a {sae.config.variant} SAE) cannot be exported to {fmt}: {reason}; {hint}.")


def representable(sae: Any, fmt: str) -> bool:
    """Whether the variant converts itself to ``fmt``."""
    from trainer.sae.interop import NotRepresentable

    try:
        getattr(sae, f"to_{fmt}")()
    except NotRepresentable:
        return False
    return True


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
    form = convert(sae, "saelens", run_url)
    cfg = {"architecture": form.architecture, "d_in": sae.config.d, "d_sae": sae.config.m,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": form.normalize_activations, "reshape_activations": "none",
           **form.cfg, "metadata": saelens_metadata(run_cfg, sae, storage_options)}
    io.save_safetensors(io.join_url(out_url, SAELENS_WEIGHTS), _float32(form.tensors), storage_options)
    io.write_json(io.join_url(out_url, SAELENS_CFG), cfg, storage_options)
    return out_url


def export_sparsify(run_url: str, out_url: str, storage_options: io.StorageOptions = None) -> str:
    """Write ``<out>/cfg.json`` + ``<out>/sae.safetensors`` (sparsify's SparseCoder)."""
    sae, _ = load_run(run_url, storage_options)
    form = convert(sae, "sparsify", run_url)
    io.save_safetensors(io.join_url(out_url, SPARSIFY_WEIGHTS), _float32(form.tensors), storage_options)
    io.write_json(io.join_url(out_url, SPARSIFY_CFG), form.cfg, storage_options)
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
