"""Config handling shared by every package: YAML -> strict pydantic model.

* :class:`StrictModel` is the base of every config and every file we write:
  unknown keys are errors (``extra="forbid"``).
* :func:`load_config` reads a YAML file, applies ``--set dotted.key=value``
  overrides (values parsed as YAML scalars/lists, so ``--set sae.m=[64,128]`` works)
  and validates; any problem becomes a :class:`store.errors.UserError` whose
  message is one sentence naming the file, key and value at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from store.errors import UserError, register_secrets

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base model: unknown keys are rejected, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value`` into (["dotted", "key"], value) with YAML value typing."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form dotted.key=value; write e.g. --set lr=1e-3.")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} has an empty key; write e.g. --set sae.m=4096.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating intermediate dicts."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(
                f"cannot set {'.'.join(path)!r}: {part!r} holds a value, not a section; check the key."
            )
        node = child
    node[path[-1]] = value


def get_dotted(data: dict[str, Any], path: list[str]) -> Any:
    """``data[path[0]][path[1]]...`` or None where a level is missing or not a mapping."""
    node: Any = data
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``--set`` overrides in order, returning ``data`` (modified in place)."""
    for item in overrides or []:
        path, value = parse_override(item)
        set_dotted(data, path, value)
    return data


def read_yaml(path: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML mapping from a local path or any fsspec URL."""
    text: str
    p = str(path)
    try:
        if "://" in p:
            from store import io

            remote = io.read_text(p, storage_options)
            if remote is None:
                raise FileNotFoundError(p)
            text = remote
        else:
            text = Path(p).read_text()
    except FileNotFoundError:
        raise UserError(f"config file {p} does not exist; check the path.") from None
    except OSError as err:
        raise UserError(f"config file {p} cannot be read ({err}); check the path and permissions.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {p} is not valid YAML{where}; fix the syntax.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One sentence for the first problem pydantic found."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "(top level)"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return f"{source}: unknown key {loc!r}; remove it or check its spelling."
    if kind == "missing":
        return f"{source}: required key {loc!r} is missing; add it."
    msg = first.get("msg", "invalid value").rstrip(".")
    if any("storage_options" in str(part) for part in first.get("loc", ())):  # may be credentials: never shown
        return f"{source}: {loc} is invalid ({msg}); fix that value (not shown: storage options may hold secrets)."
    value = first.get("input")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{source}: {loc} = {shown} is invalid ({msg}); fix that value."


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate ``data`` against ``model``; a failure is one :class:`UserError` sentence."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(describe_validation_error(err, source)) from None


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """The value of ``--storage-options``: a JSON object (None when the flag was not given)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
        problem = "is not a JSON object"
    except json.JSONDecodeError as err:
        value, problem = None, f"is not valid JSON ({err.msg} at character {err.pos})"
    if not isinstance(value, dict):  # the text itself is never shown: it may hold credentials
        raise UserError(f"the value of --storage-options {problem}; write e.g. "
                        "--storage-options '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'.")
    register_secrets(value)
    return value


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None) -> M:
    """YAML file (optional) + ``--set`` overrides -> validated ``model``.

    ``storage_options`` (from ``--storage-options``) are used to read the config itself and are set at
    each of the model's ``storage_option_keys`` (default ``("storage_options",)``; a sweep sets
    ``base.storage_options``), replacing what the file says there.
    """
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data.update(read_yaml(path, storage_options))
    apply_overrides(data, overrides)
    keys = getattr(model, "storage_option_keys", ("storage_options",))
    if storage_options is not None:
        for key in keys:
            set_dotted(data, key.split("."), dict(storage_options))
    for key in keys:  # options from the file or --set: never shown in an error either
        register_secrets(get_dotted(data, key.split(".")))
    return validate(model, data, source=str(path) if path is not None else "config")


def add_config_arguments(parser: Any, config_required: bool = True) -> None:
    """The arguments every config-driven command shares: CONFIG, ``--set KEY=VALUE``, ``--no-progress``."""
    parser.add_argument("config", nargs=None if config_required else "?",
                        help="YAML config (local path or fsspec URL)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key, YAML value, e.g. --set sae.m=4096); repeatable")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_storage_options_argument(parser)


def add_storage_options_argument(parser: Any) -> None:
    """``--storage-options JSON``: fsspec options (endpoint, credentials) for every URL the command opens."""
    parser.add_argument("--storage-options", dest="storage_options", type=parse_storage_options, default=None,
                        metavar="JSON", help="fsspec storage options for every URL the command reads or writes, "
                        "e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (overrides the config's)")
