"""Variant name → SAE class, found by module discovery; :func:`validate_sae`, :func:`build`, :func:`load`.

Adding a variant = adding one file ``trainer/sae/<name>.py`` holding a class that derives from
:class:`trainer.sae.base.SAE` (or a shared base), sets ``variant = "<name>"`` and ``config_class`` (a
pydantic config deriving from :class:`trainer.sae.config.SAEConfig` with ``variant:
Literal["<name>"]``). Every module of the ``trainer.sae`` package is imported when the registry is
first used (:func:`variants`), and defining the class registers it (``SAE.__init_subclass__``): no
list, no entry point, nothing else to edit.

The SAE config a user writes is the union of the variants' configs discriminated by ``variant``:
a key that the variant's config does not have is an error naming it.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Any

from store import io
from store.errors import UserError
from trainer.run_format import config_url, read_sae_config
from trainer.sae.base import REGISTERED, SAE
from trainer.sae.config import SAEConfig

_discovered = False


def variants() -> dict[str, type[SAE]]:
    """Every registered variant (importing each module of ``trainer.sae`` once)."""
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules([os.path.dirname(__file__)]):  # discovery: no module named here
            importlib.import_module(f"{__package__}.{info.name}")
        _discovered = True
    return dict(sorted(REGISTERED.items()))


def variant_class(name: Any) -> type[SAE]:
    """The SAE class of a variant name (ValueError naming the choices when unknown)."""
    found = variants()
    if name not in found:
        raise ValueError(f"unknown SAE variant {name!r}; choose one of {', '.join(found)}")
    return found[name]


def validate_sae(data: dict[str, Any]) -> SAEConfig:
    """The variant's own config from a dict; ValueError with one located sentence on any problem
    (``sae.<key>`` for a key the variant does not use)."""
    if "variant" not in data:
        raise ValueError("sae.variant is required (e.g. sparsemax, relu, topk)")
    cls = variant_class(data["variant"]).config_class
    refusals: dict[str, str] = getattr(cls, "field_refusals", {})
    for key in data:
        if key in refusals:
            raise ValueError(f"sae.{key}: " + refusals[key].format(variant=data["variant"]))
        if key not in cls.model_fields:
            used = ", ".join(k for k in cls.model_fields if k not in ("variant", "d"))
            raise ValueError(f"sae.{key} is not a setting of variant {data['variant']!r} (its settings: {used}); "
                             "remove it")
    try:
        return cls.model_validate(data)
    except Exception as err:  # pydantic.ValidationError: one located sentence
        errors = getattr(err, "errors", None)
        if not callable(errors):
            raise ValueError(str(err)) from None
        first = errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ValueError(f"sae.{loc} = {first.get('input')!r}: {msg}" if loc else msg) from None


def as_config(cfg: SAEConfig | dict[str, Any], source: str = "SAE config") -> SAEConfig:
    """Validate a dict (one :class:`UserError` sentence on failure) or pass a config through."""
    if isinstance(cfg, SAEConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise UserError(f"{source} must be a mapping of SAE settings, not {type(cfg).__name__}.")
    try:
        return validate_sae(cfg)
    except ValueError as err:
        raise UserError(f"{source}: {err}.") from None


def build(cfg: SAEConfig | dict[str, Any]) -> SAE:
    """A freshly initialised SAE of ``cfg.variant`` (seeded by ``cfg.seed``)."""
    config = as_config(cfg)
    return variant_class(config.variant)(config)


def load(url: str, storage_options: io.StorageOptions = None) -> SAE:
    """Restore an SAE from a directory (local path or fsspec URL) written by ``sae.save`` or a trainer
    run (its config and weights files, :mod:`trainer.run_format`)."""
    path = config_url(url)
    sae_data = read_sae_config(url, storage_options)
    if sae_data is None:
        raise UserError(f"{path} does not exist; point at a directory written by sae.save() or a trainer run.")
    sae = build(as_config(sae_data, source=path))
    sae.load_weights(url, storage_options)
    return sae


__all__ = ["as_config", "build", "load", "validate_sae", "variant_class", "variants"]
