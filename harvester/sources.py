"""Data sources: documents (text) and images, each in one deterministic order.

Text sources yield documents (strings):

* ``hf_dataset``: a Hugging Face ``datasets`` dataset (default ``Skylion007/openwebtext``;
  WikiText-103 is ``path: wikitext, name: wikitext-103-raw-v1``), streamed in its stored order.
* ``text_files``: local or fsspec files, directories or globs; ``.txt`` (one document per
  file), ``.jsonl`` (one document per line, ``text_field``), ``.parquet`` (``text_field``
  column). Files are taken in sorted order.
* ``python_docs``: offline, no download: the help topics bundled with Python
  (``pydoc_data.topics``, sorted by topic) followed by the docstrings of the standard library
  (module, then public classes and functions, modules sorted by name), read with ``ast`` from
  the ``.py`` files of the standard library directory without importing anything.

Image sources give a list of items (path or index) plus labels and class names:

* ``image_folder``: ``root/<class>/<image>`` (classes sorted, as torchvision's ImageFolder).
* ``hf_image_dataset``: a ``datasets`` dataset with ``image_field`` and ``label_field``.

Image order is a seeded permutation of all items, so that ``max_images`` takes a sample
across classes rather than the first few classes.

:func:`pack_contexts` turns documents into fixed-length contexts: tokenize, join the
documents with the separator (end-of-text) token, cut into pieces of ``context_length`` (minus
one when the model has a BOS token) and put BOS first.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harvester.config import SourceConfig
from store.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
DEFAULT_TEXT_DATASET = "Skylion007/openwebtext"
TOKENIZE_BATCH = 64  # documents per tokenizer call


def source_name(cfg: SourceConfig) -> str:
    """A short human name for the manifest."""
    if cfg.kind == "python_docs":
        return f"python_docs-{sys.version_info.major}.{sys.version_info.minor}"
    if cfg.kind == "text_files":
        return "text_files"
    if cfg.kind == "hf_dataset":
        base = cfg.path or DEFAULT_TEXT_DATASET
        return f"{base}:{cfg.name}" if cfg.name else base
    return str(cfg.path)


def source_revision(cfg: SourceConfig) -> str | None:
    """The source's revision: the configured one, or the Python version for ``python_docs``."""
    if cfg.kind == "python_docs":
        return sys.version.split()[0]
    return cfg.revision


# ----------------------------------------------------------------------------------- text

def python_docs() -> Iterator[str]:
    """Python's own documentation, in a fixed order (see the module docstring)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_") or module in ("this", "antigravity"):
            continue
        yield from module_docstrings(module)


def module_docstrings(module: str) -> Iterator[str]:
    """Docstrings of a top-level stdlib module (module, then public defs/classes), without importing it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / f"{module}.py", stdlib / module / "__init__.py"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:  # a C extension module: no Python source
        return
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield f"{module}\n\n{doc}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                yield f"{module}.{node.name}\n\n{doc}"


def expand_paths(patterns: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Files named by ``patterns`` (files, directories searched recursively, globs), sorted; fsspec URLs OK."""
    import fsspec

    found: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern, storage_options=storage_options or {})
        if not paths:
            raise UserError(f"source path {pattern} matches no files; check the path or glob.")
        for path in paths:
            if fs.isdir(path):
                inner = [p for p in fs.find(path) if p.endswith((".txt", ".jsonl", ".parquet"))]
                found.extend(fs.unstrip_protocol(p) if "://" in pattern else p for p in sorted(inner))
            elif fs.exists(path):
                found.append(fs.unstrip_protocol(path) if "://" in pattern else path)
            else:
                raise UserError(f"source file {path} does not exist; check source.paths.")
    return found


def text_file_documents(paths: list[str], text_field: str,
                        storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Documents of ``.txt`` / ``.jsonl`` / ``.parquet`` files, in the given order."""
    import json

    import fsspec

    for path in paths:
        if path.endswith(".txt"):
            with fsspec.open(path, "r", encoding="utf-8", **(storage_options or {})) as fh:
                yield fh.read()
        elif path.endswith(".jsonl"):
            with fsspec.open(path, "r", encoding="utf-8", **(storage_options or {})) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path} line {lineno} is not valid JSON; fix or remove it.") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise UserError(f"{path} line {lineno} has no {text_field!r} key; "
                                        f"set source.text_field to the key holding the text.")
                    yield str(record[text_field])
        elif path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError(f"reading {path} needs pyarrow; install it with `pip install pyarrow`.") from None
            with fsspec.open(path, "rb", **(storage_options or {})) as fh:
                table = pq.read_table(fh)
            if text_field not in table.column_names:
                raise UserError(f"{path} has no column {text_field!r}; set source.text_field to one of "
                                f"{', '.join(table.column_names)}.")
            for value in table.column(text_field).to_pylist():
                if value is not None:
                    yield str(value)
        else:
            raise UserError(f"source file {path} is not .txt, .jsonl or .parquet; convert it or remove it.")


def import_datasets() -> Any:
    """The ``datasets`` package, or a UserError saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face dataset sources need the `datasets` package; install it with "
                        "`pip install datasets` or use source.kind text_files / python_docs.") from None
    return datasets


def load_hf_dataset(cfg: SourceConfig, default_path: str | None, streaming: bool) -> Any:
    """``datasets.load_dataset`` with one-sentence errors."""
    datasets = import_datasets()
    path = cfg.path or default_path
    try:
        return datasets.load_dataset(path, cfg.name, split=cfg.split, revision=cfg.revision,
                                     streaming=streaming)
    except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
        raise UserError(f"cannot open Hugging Face dataset {path!r} split {cfg.split!r} "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); check source.path/name/"
                        f"split, and that it is cached when HF_DATASETS_OFFLINE=1.") from None


def iter_documents(cfg: SourceConfig, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Documents of a text source, in its deterministic order."""
    if cfg.kind == "python_docs":
        yield from python_docs()
    elif cfg.kind == "text_files":
        if not cfg.paths:
            raise UserError("source.kind text_files needs source.paths (files, directories or globs).")
        yield from text_file_documents(expand_paths(cfg.paths, storage_options), cfg.text_field, storage_options)
    elif cfg.kind == "hf_dataset":
        dataset = load_hf_dataset(cfg, DEFAULT_TEXT_DATASET, cfg.streaming)
        for record in dataset:
            if cfg.text_field not in record:
                raise UserError(f"dataset {cfg.path or DEFAULT_TEXT_DATASET!r} has no field {cfg.text_field!r};"
                                f" set source.text_field to one of {', '.join(record)}.")
            yield str(record[cfg.text_field])
    else:
        raise UserError(f"source.kind {cfg.kind!r} is an image source; use a text source for a language model.")


@dataclass(frozen=True)
class TokenSpec:
    """What packing needs from a tokenizer: the BOS id (or None) and the separator id."""

    bos_id: int | None
    sep_id: int


def token_spec(tokenizer: Any, model_name: str) -> TokenSpec:
    """BOS = ``bos_token`` (else ``cls_token``); separator = ``eos_token`` (else ``sep_token``, else BOS)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    sep = tokenizer.eos_token_id
    if sep is None:
        sep = tokenizer.sep_token_id
    if sep is None:
        sep = bos
    if sep is None:
        raise UserError(f"the tokenizer of {model_name} has no end-of-text, separator or BOS token to join "
                        f"documents with; use a tokenizer that defines eos_token.")
    return TokenSpec(bos_id=None if bos is None else int(bos), sep_id=int(sep))


def token_stream(documents: Iterable[str], tokenizer: Any, spec: TokenSpec) -> Iterator[np.ndarray]:
    """Token ids of each document followed by the separator (batched tokenizer calls)."""
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if ids:
                yield np.asarray([*ids, spec.sep_id], dtype=np.int64)
        batch.clear()

    for doc in documents:
        if doc.strip():
            batch.append(doc)
        if len(batch) >= TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def pack_contexts(pieces: Iterable[np.ndarray], context_length: int, bos_id: int | None,
                  max_contexts: int | None = None) -> Iterator[np.ndarray]:
    """Fixed-length contexts from a token stream; the incomplete tail is dropped.

    Each context is ``[BOS] + stream[i*b:(i+1)*b]`` with ``b = context_length - 1`` when the
    model has a BOS token, else ``stream[i*b:(i+1)*b]`` with ``b = context_length``.
    """
    body = context_length - (1 if bos_id is not None else 0)
    buffer: list[np.ndarray] = []
    held = 0
    made = 0
    for piece in pieces:
        buffer.append(piece)
        held += len(piece)
        while held >= body:
            flat = np.concatenate(buffer)
            ctx, rest = flat[:body], flat[body:]
            buffer, held = [rest], len(rest)
            yield np.concatenate([[bos_id], ctx]).astype(np.int64) if bos_id is not None else ctx.copy()
            made += 1
            if max_contexts is not None and made >= max_contexts:
                return


# --------------------------------------------------------------------------------- images

@dataclass
class ImageItems:
    """A deterministic list of images: ``items[i]`` is a file path or a dataset index."""

    items: list[Any]
    labels: np.ndarray  # (n,) int32
    class_names: list[str]
    dataset_files: list[str] = field(default_factory=list)


def image_folder(root: str) -> ImageItems:
    """``root/<class>/<image>`` files, classes and files sorted."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"image folder {root} does not exist; set source.path to an ImageFolder root.")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    items: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for path in sorted((base / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(str(path))
                labels.append(index)
    if not items:
        raise UserError(f"image folder {root} holds no images in class sub-folders (root/<class>/<image>"
                        f" with {', '.join(IMAGE_EXTENSIONS)}); check source.path.")
    return ImageItems(items, np.asarray(labels, dtype=np.int32), classes)


def hf_image_items(cfg: SourceConfig) -> ImageItems:
    """Indices of a HF image dataset with its labels and class names."""
    dataset = load_hf_dataset(cfg, None, streaming=False)
    for key in (cfg.image_field, cfg.label_field):
        if key not in dataset.column_names:
            raise UserError(f"dataset {cfg.path!r} has no column {key!r}; set source.image_field/label_field "
                            f"to one of {', '.join(dataset.column_names)}.")
    feature = dataset.features[cfg.label_field]
    labels = np.asarray(dataset[cfg.label_field], dtype=np.int32)
    names = list(getattr(feature, "names", None) or [str(i) for i in range(int(labels.max()) + 1)])
    if len(labels) == 0:
        raise UserError(f"dataset {cfg.path!r} split {cfg.split!r} holds no images; check source.split.")
    return ImageItems(list(range(len(labels))), labels, names)


def image_items(cfg: SourceConfig, seed: int, max_images: int | None) -> ImageItems:
    """The images to harvest: a seeded permutation of the source, cut to ``max_images``."""
    if cfg.kind == "image_folder":
        if not cfg.path:
            raise UserError("source.kind image_folder needs source.path (the ImageFolder root).")
        found = image_folder(cfg.path)
    elif cfg.kind == "hf_image_dataset":
        if not cfg.path:
            raise UserError("source.kind hf_image_dataset needs source.path (the dataset id).")
        found = hf_image_items(cfg)
    else:
        raise UserError(f"source.kind {cfg.kind!r} is a text source; an open_clip model needs images.")
    order = np.random.default_rng(seed).permutation(len(found.items))
    if max_images is not None:
        order = order[:max_images]
    return ImageItems([found.items[i] for i in order], found.labels[order], found.class_names)


def load_images(cfg: SourceConfig, items: list[Any]) -> list[Any]:
    """PIL images (RGB) for the given items (paths, or indices of the HF dataset)."""
    from PIL import Image

    if cfg.kind == "image_folder":
        out = []
        for path in items:
            try:
                with Image.open(path) as img:
                    out.append(img.convert("RGB"))
            except OSError as err:
                raise UserError(f"image {path} cannot be read ({err}); remove or replace it.") from None
        return out
    dataset = load_hf_dataset(cfg, None, streaming=False)
    rows = dataset.select(items)
    return [img.convert("RGB") for img in rows[cfg.image_field]]
