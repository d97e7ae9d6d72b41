"""Helpers shared by the evaluator tests: a tiny store dataset and trainer-style run directories."""

from __future__ import annotations

import torch

CTX = 16        # tokens per context
N_CTX = 48      # contexts in the dataset
LAYER = 1       # resid_pre of block 1


def write_text_dataset(url: str, model, model_name: str, seed: int = 0):
    """Harvest resid_pre of block LAYER of ``model`` on random contexts (BOS first) into the real store."""
    from store import DatasetWriter
    from store.manifest import DatasetManifest

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (N_CTX, CTX), generator=g)
    ids[:, 0] = 0
    with torch.no_grad():
        acts = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER]
    manifest = DatasetManifest(d=64, dtype="float32", shard_rows=128, chunk_rows=64, context_length=CTX,
                               model={"name": model_name, "kind": "hf_causal_lm"},
                               hook={"layer": LAYER, "site": "resid_pre"}, source={"name": "random tokens"},
                               split={"fraction": 0.25, "seed": 0})
    writer = DatasetWriter.create(url, manifest)
    rows = acts.reshape(-1, 64).numpy()
    flat_ids = ids.reshape(-1).numpy().astype("int32")
    seqs = torch.arange(N_CTX).repeat_interleave(CTX).numpy()
    pos = torch.arange(CTX).repeat(N_CTX).numpy().astype("int16")
    for shard, start in enumerate(range(0, rows.shape[0], 128)):
        sl = slice(start, start + 128)
        writer.write_shard(shard, rows[sl], token_ids=flat_ids[sl], seq_ids=seqs[sl], positions=pos[sl])
    writer.seal()
    return url


def train_sae(dataset_url: str, sae_cfg: dict, steps: int = 60, lr: float = 3e-3, seed: int = 0):
    """A really trained tiny SAE: Adam on the train split's rows at positions >= 1."""
    from store import ActivationLoader
    from trainer.sae import build

    torch.manual_seed(seed)
    sae = build({"d": 64, "seed": seed, **sae_cfg})
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    loader = ActivationLoader(dataset_url, 96, split="train", seed=seed, columns=("acts", "positions"))
    for b in range(steps):
        batch = loader.batch(b)
        x = batch.acts_on("cpu")[batch.positions != 0]
        loss = sae(x)[2]["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.post_step()
    return sae.eval()


def make_run(run_url: str, dataset_url: str, sae, exclude_positions=(0,), max_norm_multiple=None) -> str:
    """A run directory as the trainer writes it: run config.json (with an "sae" key) + sae.safetensors."""
    import json
    from pathlib import Path

    from store.filters import RowFilter
    from trainer.run_format import RowFilterRecord

    Path(run_url).mkdir(parents=True, exist_ok=True)
    filt = RowFilter(exclude_positions=list(exclude_positions), max_norm_multiple=max_norm_multiple)
    record = {"dataset": dataset_url, "runs_root": str(Path(run_url).parent), "name": Path(run_url).name,
              "sae": sae.config.model_dump(mode="json"), "exclude_positions": list(exclude_positions),
              "max_norm_multiple": max_norm_multiple, "filter": RowFilterRecord.of(filt, None).model_dump()}
    (Path(run_url) / "config.json").write_text(json.dumps(record))
    sae.save_weights(run_url)
    return run_url


