"""Variant name → SAE class, found by module discovery; :func:`validate_sae`, :func:`build`, :func:`load`.

Adding a variant = adding one file ``trainer/sae/<name>.py`` holding a class that derives from
:class:`trainer.sae.base.SAE` (or a shared base), sets ``variant = "<name>"`` and ``config_class`` (a
pydantic config deriving from :class:`trainer.sae.config.SAEConfig` with ``variant:
Literal["<name>"]``). Every module of the ``trainer.sae`` package is imported when the registry is
first used (:func:`variants`), and defining the class registers it (``SAE.__init_subclass__``): no
list, no entry point, nothing else to edit: the sweep and the report read the class's traits through
:func:`family` / :func:`reference_variant`, export calls its ``to_saelens`` / ``to_sparsify``.

The SAE config a user writes is the union of the variants' configs discriminated by ``variant``:
a key that the variant's config does not have is an error naming it.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Family:
    """A variant's traits as the sweep and the report read them (the class's ``title``, ``has_l0_knob``
    and ``is_reference``, see :class:`trainer.sae.base.SAE`)."""

    variant: str
    title: str
    has_l0_knob: bool = True
    is_reference: bool = False


def family(name: str) -> Family:
    """The traits of a variant; a name no file defines (a run of a removed variant) gets the defaults
    of a baseline with an L0 knob."""
    cls = variants().get(name)
    if cls is None:
        return Family(name, name)
    return Family(name, cls.title or name, cls.has_l0_knob, cls.is_reference)


def reference_variant() -> str | None:
    """The variant every other family is compared against (``is_reference``); None when no file declares
    one. Two declaring it is an error naming them."""
    found = [name for name, cls in variants().items() if cls.is_reference]
    if len(found) > 1:
        raise TypeError(f"SAE variants {', '.join(found)} all declare is_reference; exactly one may.")
    return found[0] if found else None


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


__all__ = ["Family", "as_config", "build", "family", "load", "reference_variant", "validate_sae", "variant_class",
           "variants"]
