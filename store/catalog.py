"""Listing datasets under a root and describing one (the ``ls`` and ``info`` commands)."""

from __future__ import annotations

from typing import Any

from store.errors import UserError
from store.io import filesystem, is_local, join_url
from store.layout import MANIFEST_KEY, bucket_missing, committed_shards, describe_access_error
from store.manifest import DatasetManifest


def list_datasets(root: str, storage_options: dict | None = None) -> list[tuple[str, DatasetManifest | None]]:
    """(url, manifest or None if invalid) of every dataset directly under ``root``."""
    import json

    fs, path = filesystem(root, storage_options)
    try:
        entries = fs.ls(path, detail=True, refresh=True) if not is_local(root) else fs.ls(path, detail=True)
    except FileNotFoundError:
        if bucket_missing(root, fs, path):
            raise UserError(f"bucket {path.split('/', 1)[0]!r} of {root} does not exist at this endpoint; "
                            "create it or fix the URL.") from None
        raise UserError(f"{root} does not exist; check the datasets root.") from None
    except Exception as err:  # noqa: BLE001 - one sentence for network/credential failures
        raise UserError(describe_access_error(root, err)) from None
    out = []
    for entry in sorted(entries, key=lambda e: e["name"]):
        if entry.get("type") != "directory":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        url = join_url(root, name)
        try:
            meta = json.loads(fs.cat_file(join_url(entry["name"], "zarr.json")))
        except (FileNotFoundError, ValueError):
            continue
        attrs = (meta.get("attributes") or {}) if meta.get("node_type") == "group" else {}
        if MANIFEST_KEY not in attrs:
            continue
        try:
            out.append((url, DatasetManifest.model_validate(attrs[MANIFEST_KEY])))
        except ValueError:
            out.append((url, None))
    return out


def summary_row(url: str, manifest: DatasetManifest | None, storage_options: dict | None = None) -> str:
    """One line per dataset for ``ls``."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if manifest is None:
        return f"{name}  (manifest does not validate; run verify)"
    m = manifest
    state = "sealed" if m.sealed else f"UNSEALED ({len(committed_shards(url, storage_options))} shards committed)"
    rows = f"{m.rows:,}" if m.rows is not None else "?"
    return (f"{name}  rows={rows}  d={m.d}  {m.dtype}  {m.model.name} {m.hook.site}@{m.hook.layer}  "
            f"source={m.source.name}  {state}")


def dataset_info(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Manifest plus storage facts (committed shards, stored bytes, split sizes) as a dict."""
    from store.dataset import open_dataset

    ds = open_dataset(url, allow_partial=True, storage_options=storage_options)
    m = ds.manifest
    stored = sum(o.nbytes for c in ds.commits.values() for o in c.objects.values())
    return {
        "url": url,
        "manifest": m.dump(),
        "manifest_hash": m.manifest_hash(),
        "committed_shards": len(ds.commits),
        "num_rows": ds.num_rows,
        "stored_bytes": stored,
        "chunks": int((ds.chunk_sizes > 0).sum()),
        "train_rows": ds.split_rows("train"),
        "eval_rows": ds.split_rows("eval"),
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable ``info`` text."""
    m = info["manifest"]
    stats = m.get("stats") or {}
    lines = [
        f"dataset      {info['url']}",
        f"state        {'sealed' if m['sealed'] else 'UNSEALED'}; {info['committed_shards']} shards committed",
        f"rows         {info['num_rows']:,} (train {info['train_rows']:,}, eval {info['eval_rows']:,}; "
        f"eval fraction {m['split']['fraction']}, seed {m['split']['seed']})",
        f"acts         d={m['d']} {m['dtype']}; chunk_rows={m['chunk_rows']} shard_rows={m['shard_rows']} "
        f"context_length={m['context_length']}",
        f"stored       {info['stored_bytes'] / 2**20:,.1f} MiB in {info['chunks']} chunks",
        f"model        {m['model']['name']} ({m['model'].get('kind')}), {m['hook']['site']} at layer "
        f"{m['hook']['layer']}",
        f"source       {m['source']['name']}" + (f" split={m['source']['split']}" if m['source'].get('split') else ""),
    ]
    if m.get("class_names") is not None:
        lines.append(f"classes      {len(m['class_names'])}")
    if stats:
        q = stats["norm_quantiles"]
        lines.append(f"norms        mean {stats['mean_norm']:.4g}; median {q['0.5']:.4g}; "
                     f"p99 {q['0.99']:.4g}; max {q['1.0']:.4g}")
    lines.append(f"created      {m.get('created')}; harvester {m.get('harvester_version')}; "
                 f"config hash {m.get('config_hash')}")
    lines.append(f"manifest     sha256 {info['manifest_hash'][:16]}...")
    return "\n".join(lines)
