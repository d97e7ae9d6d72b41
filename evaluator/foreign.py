"""SAEs from elsewhere: SAELens and sparsify folders scored with our metric definitions.

``dynsae eval DIR --dataset URL`` and ``dynsae concepts DIR --dataset URL`` accept, besides a run
directory of ours (:mod:`trainer.run_format`):

* a **SAELens** folder — ``cfg.json`` + ``sae_weights.safetensors``, loaded with
  ``sae_lens.SAE.load_from_disk`` (any architecture SAELens has registered: standard, topk,
  jumprelu, gated, …); features = ``sae.encode(x)``, x̂ = ``sae.decode(features)``, exactly SAELens's
  forward (its own input normalisation included);
* a **sparsify** folder — ``cfg.json`` + ``sae.safetensors``, loaded with
  ``sparsify.SparseCoder.load_from_disk``; codes = its top-k (acts, indices), x̂ = its decode.

:class:`ForeignSAE` wraps either in what the evaluator uses of our SAEs (``config.m/d/variant``,
``encode(x) -> Codes``, ``decode(codes, x)``, ``eval()``, ``to()``, ``parameters()``). The row
filter is the trainer's default (position 0 excluded, no norm filter): the foreign SAE was not
trained by us, so there is no run config to take one from. Folders on remote URLs are copied to a
local temporary folder first (both libraries read local paths only).

Decisions: the libraries are optional (the ``interop`` extra); a folder that needs one that is not
installed is one sentence saying which to install. ``SPARSIFY_DISABLE_TRITON=1`` is set when no GPU
is visible (sparsify's Triton decoder needs one), and sparsify's import-time print is kept off
stdout (``--json`` output stays JSON).
"""

from __future__ import annotations

import contextlib
import io as _pyio
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from store import io
from store.config import StrictModel
from store.errors import UserError
from trainer.run_format import (
    FOREIGN_CONFIG,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    RunConfig,
    folder_kind,
    neither_error,
    read_run_config,
    read_sae_config,
)
from trainer.sae import Codes

CFG = FOREIGN_CONFIG


class ForeignConfig(StrictModel):
    """What the evaluator and the concept browser read of an SAE's config."""

    variant: str
    d: int
    m: int
    k: int | None = None
    activation: str | None = None
    input_norm: str = "none"
    source_format: str
    source_url: str


class ForeignSAE(nn.Module):
    """A SAELens or sparsify SAE behind the interface of ours (module docstring)."""

    always_unit_norm = False

    def __init__(self, inner: nn.Module, config: ForeignConfig) -> None:
        super().__init__()
        self.inner = inner
        self.config = config

    @property
    def unit_input(self) -> bool:
        return False

    def _input(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != self.config.d:
            raise UserError(f"SAE input has shape {tuple(x.shape)}; the {self.config.variant} SAE of "
                            f"{self.config.source_url} expects (batch, {self.config.d}) activations.")
        return x

    def encode(self, x: Tensor) -> Codes:
        """Codes of a batch: dense SAELens features, or sparsify's padded top-k (acts, indices)."""
        x = self._input(x)
        if self.config.source_format == "sparsify":
            out = self.inner.encode(x.to(self.inner.dtype))
            return Codes(m=self.config.m, idx=out.top_indices, val=out.top_acts.float())
        return Codes(m=self.config.m, dense=self.inner.encode(x).float())

    def decode(self, codes: Codes, x: Tensor | None = None) -> Tensor:
        """x̂ (B, d) float32 with the library's own decoder (``x`` is not needed)."""
        if self.config.source_format == "sparsify":
            return self.inner.decode(codes.val, codes.idx).float()
        return self.inner.decode(codes.to_dense().to(self.inner.dtype)).float()

    @torch.no_grad()
    def decoder_directions(self) -> Tensor:
        """Unit rows of the library's W_dec (M, d) float32: the direction latent j adds to x̂ (both libraries
        decode x̂ = Σ_j f_j W_dec,j + b_dec; SAELens's activation normalisation is a positive scale)."""
        rows = self.inner.W_dec.detach().float()
        if tuple(rows.shape) != (self.config.m, self.config.d):
            raise UserError(f"the {self.config.source_format} SAE at {self.config.source_url} has W_dec of shape "
                            f"{tuple(rows.shape)}, not (d_sae, d_in) = ({self.config.m}, {self.config.d}).")
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def to(self, *args: Any, **kwargs: Any) -> ForeignSAE:
        """Move the wrapped SAE with its own ``to`` (SAELens keeps its device in an attribute)."""
        self.inner = self.inner.to(*args, **kwargs)
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Codes, dict[str, Tensor]]:
        codes = self.encode(x)
        return self.decode(codes, x), codes, {}


# ---- recognising and loading a folder ------------------------------------------------------------


@contextlib.contextmanager
def local_copy(url: str, names: tuple[str, ...], storage_options: io.StorageOptions) -> Iterator[str]:
    """A local folder holding ``names`` of ``url``: the folder itself when it is local, else a temporary copy
    removed on exit (both libraries load the weights into memory, so the copy is not needed afterwards)."""
    if io.is_local(url):
        yield io.local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="dynsae-foreign-") as folder:
        for name in names:
            data = io.read_bytes(io.join_url(url, name), storage_options)
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(data or b"")
        yield folder


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for a one-sentence error."""
    return (str(err).splitlines() or [""])[0][:200]


def _import(module: str, extra: str) -> Any:
    try:
        with contextlib.redirect_stdout(_pyio.StringIO()):
            return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise UserError(f"reading this folder needs the {extra} package ({err.name} is missing); install it "
                        "with `pip install 'dynsae[interop]'`.") from None


def load_saelens(url: str, storage_options: io.StorageOptions = None) -> ForeignSAE:
    """A SAELens folder as a :class:`ForeignSAE`."""
    cfg = io.read_json_object(io.join_url(url, CFG), storage_options, what="a SAELens config") or {}
    sae_lens = _import("sae_lens", "sae-lens")
    from sae_lens.registry import SAE_CLASS_REGISTRY

    arch = cfg.get("architecture", "standard")
    if arch not in SAE_CLASS_REGISTRY:
        hint = (" (a dynsae export: evaluate the original run instead)" if str(arch).startswith("dynsae")
                else "")
        raise UserError(f"{io.join_url(url, CFG)} names architecture {arch!r}, which SAELens does not know"
                        f"{hint}; the known ones are {', '.join(sorted(SAE_CLASS_REGISTRY))}.")
    try:
        with local_copy(url, (CFG, SAELENS_WEIGHTS), storage_options) as folder:
            inner = sae_lens.SAE.load_from_disk(folder)
    except (KeyError, ValueError, RuntimeError, TypeError, SafetensorError, OSError) as err:
        raise UserError(f"SAELens cannot load {url}: {type(err).__name__}: {first_line(err)}; "
                        "re-save it with sae.save_model().") from None
    c = inner.cfg
    norm = c.normalize_activations
    config = ForeignConfig(variant=f"saelens:{c.architecture()}", d=int(c.d_in), m=int(c.d_sae),
                           k=getattr(c, "k", None), input_norm="none" if norm == "none" else f"saelens:{norm}",
                           source_format="saelens", source_url=url)
    return ForeignSAE(inner, config)


def load_sparsify(url: str, storage_options: io.StorageOptions = None) -> ForeignSAE:
    """A sparsify folder as a :class:`ForeignSAE`."""
    cfg = io.read_json_object(io.join_url(url, CFG), storage_options, what="a sparsify config") or {}
    if "d_in" not in cfg:
        raise neither_error(url)
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = _import("sparsify", "eai-sparsify")
    try:
        with local_copy(url, (CFG, SPARSIFY_WEIGHTS), storage_options) as folder:
            inner = sparsify.SparseCoder.load_from_disk(folder)
    except (KeyError, ValueError, RuntimeError, TypeError, SafetensorError, OSError) as err:
        raise UserError(f"sparsify cannot load {url}: {type(err).__name__}: {first_line(err)}; "
                        "re-save it with SparseCoder.save_to_disk().") from None
    if inner.cfg.transcode or inner.W_skip is not None:
        raise UserError(f"{url} is a sparsify transcoder or has a skip connection; only plain SAEs "
                        "(reconstructing their own input) can be scored against a dataset.")
    config = ForeignConfig(variant=f"sparsify:{inner.cfg.activation}", d=int(inner.d_in),
                           m=int(inner.num_latents), k=int(inner.cfg.k), source_format="sparsify",
                           source_url=url)
    return ForeignSAE(inner, config)


def load_foreign(url: str, storage_options: io.StorageOptions = None) -> ForeignSAE | None:
    """The SAELens/sparsify SAE at ``url``, or None when the folder is neither (e.g. a run of ours)."""
    fmt = folder_kind(url, storage_options)
    if fmt not in ("saelens", "sparsify"):
        return None
    return (load_saelens if fmt == "saelens" else load_sparsify)(url, storage_options)


def open_sae(url: str, dataset_url: str | None = None,
             storage_options: io.StorageOptions = None) -> tuple[RunConfig, Any]:
    """(run config, SAE) of a run of ours or a foreign folder, for the evaluator and the browser.

    The config names the dataset to score on: ``dataset_url`` when given, else the run's own. A foreign
    folder (or an SAE saved on its own) needs ``dataset_url`` and gets the trainer's default row filter;
    a foreign SAE's d_in must be the dataset's d.
    """
    foreign = load_foreign(url, storage_options)
    if foreign is None:
        if folder_kind(url, storage_options) != "run":
            raise neither_error(url)
        from trainer.sae import load

        cfg = read_run_config(url, storage_options)
        if cfg is None:  # a directory written by SAE.save: an SAE config, no run
            cfg = RunConfig(sae=read_sae_config(url, storage_options) or {})
        cfg = cfg.with_dataset(dataset_url)
        if not cfg.dataset:
            raise UserError(f"{url} holds an SAE without a run config naming its dataset (saved on its own); "
                            "pass --dataset URL (a dataset harvested at the SAE's model and hook).")
        return cfg, load(url, storage_options)
    if not dataset_url:
        raise UserError(f"{url} is a {foreign.config.source_format} folder, which names no dataset of ours; "
                        "pass --dataset URL (a dataset harvested at the SAE's model and hook).")
    from store.layout import read_manifest

    d = read_manifest(dataset_url, storage_options).d
    if d != foreign.config.d:
        raise UserError(f"the {foreign.config.source_format} SAE at {url} has d_in = {foreign.config.d} but "
                        f"dataset {dataset_url} has d = {d}; pass a dataset harvested at the SAE's model and hook.")
    return RunConfig(dataset=dataset_url, sae=foreign.config.model_dump(mode="json")), foreign
