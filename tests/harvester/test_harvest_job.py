"""The harvest job end to end on a real local Ray: values, determinism, resume after SIGKILL, S3, bad input."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from harvester.__main__ import main
from harvester.config import HarvestConfig
from harvester.job import harvest, join_output
from store import open_dataset
from store.errors import run_cli
from store.layout import array_names, read_commits, read_manifest, shard_key

REPO = Path(__file__).resolve().parents[2]
N_SHARDS = 20  # 8 contexts of 32 tokens per shard


def text_cfg(model: Path, output: Path | str, shards: int = N_SHARDS, **extra) -> HarvestConfig:
    data = {"output": str(output), "source": {"kind": "python_docs"},
            "model": {"kind": "hf_causal_lm", "name": str(model)}, "hook": {"layer": 1, "site": "resid_pre"},
            "context_length": 32, "max_tokens": 256 * shards, "chunk_rows": 64, "shard_rows": 256,
            "batch_size": 2, "eval_fraction": 0.25}
    data.update(extra)
    return HarvestConfig.model_validate(data)


def digests(url: str) -> dict[int, dict[str, str]]:
    """sha256 of every stored shard object, per shard (from the commit records)."""
    return {s: {k: o.sha256 for k, o in rec.objects.items()} for s, rec in read_commits(url).items()}


@pytest.fixture(scope="module")
def reference(ray_local, tiny_gpt2, tmp_path_factory):
    """One uninterrupted 1-worker text harvest (the reference bytes)."""
    cfg = text_cfg(tiny_gpt2, tmp_path_factory.mktemp("ref"))
    result = harvest(cfg, progress=False)
    return cfg, result


def test_text_rows_equal_an_independent_forward_pass(reference, tiny_gpt2):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from harvester.sources.python_docs import python_doc_texts as python_docs

    cfg, result = reference
    ds = open_dataset(result.url)
    m = ds.manifest
    assert m.sealed and ds.num_rows == result.rows == 256 * N_SHARDS and m.dtype == "float16" and m.d == 64
    assert (m.context_length, m.chunk_rows, m.shard_rows) == (32, 64, 256)
    assert (m.hook.layer, m.hook.site, m.model.kind) == (1, "resid_pre", "hf_causal_lm")
    assert m.split.fraction == 0.25 and 0 < len(ds.eval_chunks()) < ds.num_rows // 64
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    # independent packing: docs joined by <|endoftext|>, 31 tokens per context after BOS
    stream: list[int] = []
    for doc in python_docs():
        stream += tok(doc, add_special_tokens=False).input_ids + [eot]
        if len(stream) > 31 * 8 * N_SHARDS:
            break
    expected = np.array([[eot] + stream[i * 31:(i + 1) * 31] for i in range(8 * N_SHARDS)])
    token_ids = ds.read(0, ds.num_rows, "token_ids").reshape(-1, 32)
    np.testing.assert_array_equal(token_ids, expected)
    np.testing.assert_array_equal(ds.read(0, ds.num_rows, "seq_ids"), np.repeat(np.arange(8 * N_SHARDS), 32))
    np.testing.assert_array_equal(ds.read(0, ds.num_rows, "positions"), np.tile(np.arange(32), 8 * N_SHARDS))
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    picks = [0, 9, 8 * N_SHARDS - 1]
    with torch.no_grad():
        hs = model(torch.from_numpy(expected[picks]), output_hidden_states=True).hidden_states[1]
    acts = ds.read(0, ds.num_rows).reshape(-1, 32, 64)[picks]
    torch.testing.assert_close(torch.from_numpy(acts).float(), hs.half().float(), rtol=2e-3, atol=2e-3)
    all_acts = ds.read(0, ds.num_rows).astype(np.float64)
    np.testing.assert_allclose(m.stats.mean, all_acts.mean(0), rtol=1e-9, atol=1e-12)
    # the store sums squares in float32 per row (relative error ~1e-7·√d), then float64
    assert m.stats.mean_norm == pytest.approx(np.linalg.norm(all_acts, axis=1).mean(), rel=1e-6)


def test_two_workers_write_the_same_bytes_as_one(reference, tmp_path):
    cfg, result = reference
    two = harvest(cfg.model_copy(update={"output": str(tmp_path), "workers": 2}), progress=False)
    assert Path(two.url).name == Path(result.url).name  # same config -> same dataset name
    assert digests(two.url) == digests(result.url)
    assert len(digests(two.url)) == N_SHARDS


def cli_args(out: Path, model: Path) -> list[str]:
    """``python -m harvester run`` of :func:`text_cfg`'s harvest, as --set overrides."""
    args = [sys.executable, "-m", "harvester", "run", "--no-progress"]
    for key, value in (("output", out), ("source.kind", "python_docs"), ("model.kind", "hf_causal_lm"),
                       ("model.name", model), ("hook.layer", 1), ("context_length", 32),
                       ("max_tokens", 256 * N_SHARDS), ("chunk_rows", 64), ("shard_rows", 256), ("batch_size", 2),
                       ("eval_fraction", 0.25)):
        args += ["--set", f"{key}={value}"]
    return args


def wait_for_first_commit(proc: subprocess.Popen, commits: Path) -> None:
    """Poll (deadline 150 s) until the harvest subprocess has committed a shard."""
    deadline = time.time() + 150
    while not (commits.is_dir() and any(commits.glob("*.json"))):
        assert proc.poll() is None, "the harvest subprocess exited before its first commit"
        assert time.time() < deadline, "no shard was committed in time"
        time.sleep(0.01)


def test_rerun_after_sigkill_resumes_to_the_same_bytes(reference, tiny_gpt2, tmp_path):
    cfg, result = reference
    out = tmp_path / "killed"
    url = join_output(cfg.model_copy(update={"output": str(out)}))
    commits = Path(url) / "commits"
    proc = subprocess.Popen(cli_args(out, tiny_gpt2), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_first_commit(proc, commits)
        driver = psutil.Process(proc.pid)
        family = [driver, *driver.children(recursive=True)]  # driver, Ray, its workers
        os.killpg(proc.pid, signal.SIGKILL)
        for p in family:  # anything outside the process group is killed by its own id
            with contextlib.suppress(psutil.NoSuchProcess):  # it may end between the look and the kill
                if p.is_running():
                    p.kill()
        psutil.wait_procs(family, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = set(int(p.stem) for p in commits.glob("*.json"))
    assert 1 <= len(done_before) < N_SHARDS, "the kill must land mid-harvest"
    with pytest.raises(Exception, match="unsealed|not sealed|partial"):
        open_dataset(url)
    resumed = harvest(cfg.model_copy(update={"output": str(out)}), progress=False)
    assert resumed.url == url and resumed.resumed_shards == len(done_before)
    assert digests(url) == digests(result.url)
    assert not list(Path(url).rglob("*.partial"))  # a write the kill cut short leaves nothing once resumed
    np.testing.assert_array_equal(open_dataset(url).read(0, 256 * N_SHARDS),
                                  open_dataset(result.url).read(0, 256 * N_SHARDS))
    again = harvest(cfg.model_copy(update={"output": str(out)}), progress=False)
    assert again.skipped and again.rows == 256 * N_SHARDS


def live(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``procs`` still running (zombies waiting to be reaped count as gone)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(reference, tiny_gpt2, tmp_path):
    """SIGINT to `python -m harvester run` once a shard is committed: exit 130 within 30 s with one
    sentence on how to resume, no process left, every shard committed or absent; the re-run
    resumes to the bytes of the uninterrupted harvest."""
    cfg, result = reference
    out = tmp_path / "interrupted"
    url = join_output(cfg.model_copy(update={"output": str(out)}))
    commits = Path(url) / "commits"
    proc = subprocess.Popen(cli_args(out, tiny_gpt2), cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_commit(proc, commits)
        driver = psutil.Process(proc.pid)
        family = [driver, *driver.children(recursive=True)]  # driver, its Ray, the Ray workers
        assert len(family) > 2
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the driver
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        kept = sorted(int(p.stem) for p in commits.glob("*.json"))
        assert err.strip().splitlines()[-1] == (f"error: harvest interrupted with {len(kept)} shard(s) committed "
                                                f"at {url}; run the same command again to resume from them.")
        deadline = time.time() + 10  # the driver waited for them; allow the kernel to reap
        while live(family):
            assert time.time() < deadline, f"left behind: {[p.cmdline() for p in live(family)]}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert 1 <= len(kept) < N_SHARDS, "the interrupt must land mid-harvest"
    stored = {str(p.relative_to(url)) for p in Path(url).glob("*/c/**/*") if p.is_file()}
    names = array_names(read_manifest(url))
    # every shard is committed (whole) or absent: no torn object, no partial file of a killed write
    assert stored == {shard_key(name, s) for name in names for s in kept}
    assert not [p for p in commits.iterdir() if not p.name.endswith(".json")]
    resumed = harvest(cfg.model_copy(update={"output": str(out)}), progress=False)
    assert resumed.url == url and resumed.resumed_shards == len(kept)
    assert digests(url) == digests(result.url)
    assert open_dataset(url).manifest.sealed


def test_harvest_to_s3_on_loopback(reference, tiny_gpt2, s3_bucket):
    cfg, result = reference
    s3 = harvest(text_cfg(tiny_gpt2, f"{s3_bucket}/acts", shards=3), progress=False)
    assert s3.url.startswith(f"{s3_bucket}/acts/") and s3.rows == 3 * 256
    ds = open_dataset(s3.url)
    assert ds.manifest.sealed and ds.num_rows == 768
    ref = digests(result.url)
    assert digests(s3.url) == {s: ref[s] for s in range(3)}  # the same shards as the longer local run


def test_vision_rows_labels_and_values(ray_local, tiny_clip, tmp_path):
    import open_clip
    from PIL import Image
    from tests_harvester_helpers import manual_vit_tokens

    cfg = HarvestConfig.model_validate({
        "output": str(tmp_path), "source": {"kind": "image_folder", "path": str(tiny_clip["images"])},
        "model": {"kind": "open_clip", "name": str(tiny_clip["config"]), "pretrained": str(tiny_clip["ckpt"])},
        "hook": {"layer": -2, "site": "resid_post"}, "max_images": 20, "chunk_rows": 34, "shard_rows": 102,
        "batch_size": 4, "dtype": "float32", "seed": 3})
    result = harvest(cfg, progress=False)
    ds = open_dataset(result.url)
    m = ds.manifest
    assert result.rows == ds.num_rows == 20 * 17 and m.context_length == 17 and m.class_names == ["cat", "dog", "eel"]
    files = sorted(str(p) for p in tiny_clip["images"].rglob("*.png"))
    order = np.random.default_rng(3).permutation(len(files))[:20]
    np.testing.assert_array_equal(ds.labels(), [m.class_names.index(files[i].split("/")[-2]) for i in order])
    np.testing.assert_array_equal(ds.read(0, ds.num_rows, "token_ids"), -1)
    np.testing.assert_array_equal(ds.read(0, ds.num_rows, "positions"), np.tile(np.arange(17), 20))
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-vit-test", pretrained=str(tiny_clip["ckpt"]))
    images = torch.stack([preprocess(Image.open(files[i]).convert("RGB")) for i in order])
    with torch.no_grad():
        expected = manual_vit_tokens(model.eval().visual, images, 2)  # output of block 1 = layer -2 of 3
    stored = torch.from_numpy(ds.read(0, ds.num_rows).reshape(20, 17, 32))
    torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-5)


def test_labelled_text_keeps_one_document_per_context(ray_local, tiny_gpt2, tmp_path):
    """label_from folder: every context is a piece of one document, with its class and document id."""
    from transformers import AutoTokenizer

    from harvester.sources import SourceConfig

    words = "the cat sat on a mat and then the dog ran far away from home".split()
    rng = np.random.default_rng(0)
    for cls in ("animals", "places", "things"):
        (tmp_path / "corpus" / cls).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "corpus" / cls / f"{i}.txt").write_text(" ".join(rng.choice(words, 20 + 25 * i)))
    source = {"kind": "text_files", "paths": [str(tmp_path / "corpus")], "label_from": "folder"}
    cfg = text_cfg(tiny_gpt2, tmp_path / "out", shards=2, source=source, context_length=16, chunk_rows=32,
                   shard_rows=64, max_tokens=None, eval_fraction=0.0)
    ds = open_dataset(harvest(cfg, progress=False).url)
    m = ds.manifest
    assert m.class_names == ["animals", "places", "things"] and m.documents
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    docs = list(SourceConfig(**source).labelled_documents())
    ids = ds.read(0, ds.num_rows, "token_ids").reshape(-1, 16)
    doc_ids, labels = ds.doc_ids(), ds.labels()
    assert len(ids) == len(doc_ids) == len(labels) > len(set(doc_ids.tolist()))  # long documents span contexts
    pieces: dict[int, int] = {}
    for seq, (doc, label) in enumerate(zip(doc_ids.tolist(), labels.tolist(), strict=True)):
        text, want = docs[doc]
        body = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        k = pieces.get(doc, 0)
        assert label == want and ids[seq, 0] == tok.bos_token_id
        assert ids[seq, 1:].tolist() == body[15 * k:15 * (k + 1)]  # the k-th piece of this document only
        pieces[doc] = k + 1
    np.testing.assert_array_equal(ds.read(0, ds.num_rows, "seq_ids"), np.repeat(np.arange(len(ids)), 16))


def cli_error(args: list[str]) -> str:
    err = io.StringIO()
    with redirect_stderr(err):
        assert run_cli(main, ["run", "--no-progress", *args]) == 2
    return err.getvalue().strip()


def test_bad_input_is_one_sentence_before_any_work(tiny_gpt2, tiny_clip, tmp_path):
    base = ["--set", f"output={tmp_path / 'out'}", "--set", "source.kind=python_docs", "--set", "max_tokens=512",
            "--set", "context_length=32", "--set", f"model.name={tiny_gpt2}", "--set", "hook.layer=1"]
    msg = cli_error(base + ["--set", "model.name=./no/such/model"])
    assert msg == "error: model folder ./no/such/model does not exist; check model.name."
    msg = cli_error(base + ["--set", "hook.layer=5"])
    assert "layer 5 is out of range for" in msg and "2 blocks" in msg and "-2 to 1" in msg
    assert "HF_HUB_OFFLINE=1 forbids downloading" in cli_error(base + ["--set", "model.name=gpt2"])
    (tmp_path / "empty.txt").write_text("")
    msg = cli_error(base + ["--set", "source.kind=text_files", "--set", f"source.paths=[{tmp_path / 'empty.txt'}]"])
    assert "holds fewer than 32 tokens of text" in msg
    vision = ["--set", f"output={tmp_path / 'out'}", "--set", "source.kind=image_folder",
              "--set", "model.kind=open_clip", "--set", f"model.name={tiny_clip['config']}", "--set", "hook.layer=-2",
              "--set", f"model.pretrained={tiny_clip['ckpt']}"]
    assert "holds no images" in cli_error(vision + ["--set", f"source.path={tiny_clip['empty']}"])
    assert "open_clip has no model 'ViT-Nope'" in cli_error(vision + ["--set", "model.name=ViT-Nope"])
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    msg = cli_error(base + ["--set", f"output={blocker}"])
    assert msg.startswith("error: cannot") and f"{blocker}/" in msg and msg.count("\n") == 0
    assert "unknown key 'max_tokenz'" in cli_error(base + ["--set", "max_tokenz=5"])
    assert not (tmp_path / "out").exists()  # nothing was written for any of these


def test_a_gpu_harvest_on_a_machine_without_a_gpu_is_one_sentence_and_resumable(tiny_gpt2, tmp_path):
    """``num_gpus_per_worker: 1`` (as in the paper's configs) where the harvest's own local Ray has no GPU:
    Ray would keep its tasks pending forever; instead the harvest exits 2 with one sentence naming the
    amounts and the fix and commits nothing. The dataset it opened lies where a CPU harvest of the same
    config finds and resumes it (the GPU count is not part of a dataset's identity), and is not sealed."""
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local instance
    proc = subprocess.run([*cli_args(out, tiny_gpt2), "--set", "num_gpus_per_worker=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.fullmatch(r"error: 1 harvest task asks for CPU \d+, GPU 1 but the local Ray instance has CPU \d+, "
                        r"GPU 0, so nothing would ever run; set num_gpus_per_worker=0 to harvest on this machine's "
                        r"CPUs, or ray_address to a cluster with GPU nodes\.", proc.stderr.strip().splitlines()[-1])
    url = join_output(text_cfg(tiny_gpt2, out))
    assert not list((Path(url) / "commits").glob("*.json"))
    with pytest.raises(Exception, match="unsealed|not sealed|partial"):
        open_dataset(url)


def test_sigterm_stops_a_harvest_like_ctrl_c():
    """Inside a Ray session (harvest and sweep alike) SIGTERM, like SIGINT, sets the flag the driver's
    waits look at, which raises the interrupt naming the signal (so the same cleanup runs and the exit
    status is 128 + signal); outside, the previous handlers are back."""
    from store.cluster import Interrupted, catch_interrupts

    before = signal.getsignal(signal.SIGTERM)
    with catch_interrupts() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 10  # the handler runs at the next bytecode; poll until it has
        while flag.signum is None and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(Interrupted, match="SIGTERM") as err:
            flag.check()
    assert err.value.signum == signal.SIGTERM and isinstance(err.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_harvest_on_the_same_url_waits_and_writes_nothing(ray_local, reference, tiny_gpt2, tmp_path):
    """A harvest subprocess is writing (it has committed a shard) when an in-process harvest of the same
    config starts: the second waits for the dataset's lease, then finds the dataset sealed and writes nothing
    (without the lease it would write the same shards beside the first, and delete its in-flight files). The
    dataset verifies and holds the reference bytes. (Two writers taking the lease at the same instant:
    tests/store/test_store_lease.py.) The subprocess joins the session's Ray (``RAY_ADDRESS``), as a second
    job on one cluster would: the lease, not the Ray, keeps the two apart (and no Ray of its own is started)."""
    from store.lease import LEASE_FILE
    from store.verify import verify_dataset

    cfg, result = reference
    out = tmp_path / "together"
    url = join_output(cfg.model_copy(update={"output": str(out)}))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cli_args(out, tiny_gpt2), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_commit(proc, Path(url) / "commits")
        mine = harvest(cfg.model_copy(update={"output": str(out)}), progress=False)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert mine.url == url and mine.skipped  # it waited (or came after the end): it wrote no shard
    assert verify_dataset(url) == []
    assert digests(url) == digests(result.url)
    assert not (Path(url) / LEASE_FILE).exists()
    assert [p.name for p in out.iterdir()] == [Path(url).name]


PLANTED_SECRET = "planted-secret-5f0c2a9e"


def spying_run_shards(plan, works):
    """The harvest task, run through a spy: its arguments must not carry the planted secret, and its
    environment must (the runtime env brought it)."""
    import pickle

    from harvester.job import run_shards

    assert PLANTED_SECRET.encode() not in pickle.dumps((plan, works)), "a credential travelled as a task argument"
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") == PLANTED_SECRET, "the runtime env did not bring the credential"
    yield from run_shards(plan, works)


def test_credentials_reach_workers_in_the_runtime_env_not_in_arguments(reference, tiny_gpt2, tmp_path, monkeypatch):
    """A planted AWS secret in the driver's environment reaches the harvest's tasks on a Ray the harvest
    did not start (the session's), through their runtime env; no task argument holds it."""
    from ray import cloudpickle

    import harvester.job

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    monkeypatch.setattr(harvester.job, "run_shards", spying_run_shards)
    cfg, result = reference
    spied = harvest(text_cfg(tiny_gpt2, tmp_path, shards=2), progress=False)
    assert digests(spied.url) == {s: digests(result.url)[s] for s in range(2)}


def test_a_harvest_task_gives_back_the_thread_count_it_found(tiny_gpt2, tmp_path, monkeypatch):
    """Ray hands a harvest task's worker process to later tasks (a training run, an evaluation): the task
    computes on its own thread count (its CPUs, or OMP_NUM_THREADS when set) and gives the process back
    with the count it found."""
    from harvester.job import build_manifest, open_or_create, plan_job, run_shards, task_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert task_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert task_threads(3) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert task_threads(3) == 3  # a cap, never more threads than the task's CPUs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan, shards, fields = plan_job(text_cfg(tiny_gpt2, tmp_path, shards=2))
    open_or_create(plan, build_manifest(plan, fields))
    found = torch.get_num_threads()
    plan.threads = found + 1
    seen = []
    for done in run_shards(plan, list(shards)):
        seen.append(torch.get_num_threads())
        assert done.rows == 256
    assert seen == [found + 1] * 2 and torch.get_num_threads() == found
