"""Fixtures for the concept browser: tiny real datasets (store writer), real SAEs, headless Chromium.

* ``text_model_dir``: a folder with a word-level tokenizer trained in the test and a tiny random
  GPT-2 (2 layers, d = 32) saved next to it, so the manifest's ``model.name`` is a real model.
* ``text_dataset``: its layer-1 resid_pre activations of 48 contexts of 16 tokens, written with
  ``store.DatasetWriter`` (several shards, 25% eval chunks) and sealed.
* ``text_runs``: two run directories (topk k=4 and sparsemax, m = 40) with a trainer-style
  config.json (``"sae"`` + ``"dataset"`` + ``exclude_positions``) and random SAE weights.
* ``vision_dataset`` / ``vision_run``: 12 synthetic images (a circle or a square) in an ImageFolder, 197 rows per image
  (CLS + 14×14 patches, synthetic activations), labels and class names; a topk run on it.
* ``chromium``: headless Debian Chromium driven from the command line (``--dump-dom`` and
  ``--screenshot``); skips with the reason when /usr/bin/chromium is missing. ``devtools``: a page
  driven over the DevTools protocol on ``--remote-debugging-pipe`` (real key presses).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

WORDS = ("the cat dog sat ran on under mat tree red blue green big small quick slow house river "
         "stone bird sings eats fish bread and or but").split()
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "concepts"


def write_run(run_dir: Path, dataset_url: str, sae_cfg: dict, seed: int) -> str:
    """A run directory: trainer-style config.json and random weights of the SAE."""
    import trainer.sae

    torch.manual_seed(seed)
    sae = trainer.sae.build(sae_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"dataset": dataset_url, "name": run_dir.name, "sae": sae.config.model_dump(mode="json"),
              "exclude_positions": [0], "max_norm_multiple": None}
    (run_dir / "config.json").write_text(json.dumps(config))
    sae.save_weights(str(run_dir))
    return str(run_dir)


@pytest.fixture(scope="session")
def words() -> tuple[str, ...]:
    """The vocabulary of the synthetic text (besides <bos>, <eos>, <unk>)."""
    return tuple(WORDS)


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """Folder with a trained word-level tokenizer and a tiny random GPT-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_lm")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<bos>", "<eos>", "<unk>"])
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(fast), n_positions=32,
                     bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(cfg).eval().save_pretrained(root)
    return root


def manifest(**kw):
    from store.manifest import DatasetManifest

    return DatasetManifest(**kw)


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory, text_model_dir):
    """Sealed dataset of the tiny GPT-2's layer-1 resid_pre on 48 contexts × 16 tokens (BOS first)."""
    from transformers import AutoTokenizer

    from harvester.config import ModelConfig
    from harvester.models import load_model
    from store import DatasetWriter

    tok = AutoTokenizer.from_pretrained(text_model_dir)
    rng = np.random.default_rng(0)
    n_seq, ctx = 48, 16
    ids = np.array([[tok.bos_token_id] + tok.convert_tokens_to_ids(list(rng.choice(WORDS, ctx - 1)))
                    for _ in range(n_seq)], dtype=np.int64)
    adapter = load_model(ModelConfig(kind="hf_causal_lm", name=str(text_model_dir)), "cpu")
    acts = adapter.capture(torch.from_numpy(ids), 1, "resid_pre").reshape(-1, 32).numpy().astype(np.float32)
    url = str(tmp_path_factory.mktemp("store") / "text")
    man = manifest(d=32, dtype="float32", shard_rows=256, chunk_rows=64, context_length=ctx,
                   model={"name": str(text_model_dir), "kind": "hf_causal_lm"},
                   hook={"layer": 1, "site": "resid_pre"}, source={"name": "synthetic words"},
                   split={"fraction": 0.25, "seed": 1})
    writer = DatasetWriter.create(url, man)
    rows = n_seq * ctx
    for shard, start in enumerate(range(0, rows, 256)):
        stop = min(rows, start + 256)
        writer.write_shard(shard, acts[start:stop], token_ids=ids.reshape(-1)[start:stop].astype(np.int32))
    writer.seal()
    return url


@pytest.fixture(scope="session")
def text_runs(tmp_path_factory, text_dataset):
    """(topk run, sparsemax run) on the text dataset, m = 40."""
    root = tmp_path_factory.mktemp("runs")
    a = write_run(root / "topk-40", text_dataset, {"variant": "topk", "d": 32, "m": 40, "k": 4}, seed=1)
    b = write_run(root / "sparsemax-40", text_dataset, {"variant": "sparsemax", "d": 32, "m": 40}, seed=2)
    return a, b


@pytest.fixture(scope="session")
def vision_dataset(tmp_path_factory):
    """12 synthetic images (2 classes) and a sealed dataset of 197 synthetic rows per image (d = 8)."""
    from PIL import Image, ImageDraw

    from store import DatasetWriter

    root = tmp_path_factory.mktemp("vision")
    folder = root / "images"
    classes = ["circle", "square"]
    files = []
    g = np.random.default_rng(0)
    for i in range(12):
        cls = classes[i % 2]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (56, 40), tuple(int(v) for v in g.integers(120, 255, 3)))
        box = (8 + i, 6, 32 + i, 30)
        colour = tuple(int(v) for v in g.integers(0, 120, 3))
        draw = ImageDraw.Draw(img)
        (draw.ellipse if cls == "circle" else draw.rectangle)(box, fill=colour)
        path = folder / cls / f"{i}.png"
        img.save(path)
        files.append(str(path))
    ctx = 197
    acts = g.standard_normal((12 * ctx, 8)).astype(np.float32)
    labels = np.array([i % 2 for i in range(12)], dtype=np.int32)
    url = str(root / "store")
    man = manifest(d=8, dtype="float32", shard_rows=ctx * 4, chunk_rows=ctx * 2, context_length=ctx,
                   model={"name": "ViT-B-16", "kind": "open_clip", "pretrained": "openai"},
                   hook={"layer": 10, "site": "resid_post"},
                   source={"name": str(folder), "kind": "image_folder", "files": files},
                   class_names=classes, split={"fraction": 0.5, "seed": 0})
    writer = DatasetWriter.create(url, man)
    for shard in range(3):
        rows = slice(shard * 4 * ctx, (shard + 1) * 4 * ctx)
        writer.write_shard(shard, acts[rows], labels=labels[shard * 4:(shard + 1) * 4])
    writer.seal()
    return url


@pytest.fixture(scope="session")
def vision_run(tmp_path_factory, vision_dataset):
    """A topk run (m = 24, k = 3) on the vision dataset."""
    root = tmp_path_factory.mktemp("vruns")
    return write_run(root / "vit-topk", vision_dataset, {"variant": "topk", "d": 8, "m": 24, "k": 3}, seed=3)


class Chromium:
    """Headless Chromium from the command line: the DOM after the page's scripts ran, or a screenshot."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.binary, self.profile = binary, profile

    def _args(self) -> list[str]:
        return [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--virtual-time-budget=5000",
                "--window-size=1280,900"]

    def dump_dom(self, url: str) -> str:
        out = subprocess.run(self._args() + ["--dump-dom", url], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    def screenshot(self, url: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(self._args() + [f"--screenshot={path}", url], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and path.exists(), out.stderr[-2000:]
        return path


class DevTools:
    """A page driven over the Chrome DevTools protocol on ``--remote-debugging-pipe`` (fds 3/4, NUL-framed
    JSON): no websocket package needed. ``evaluate`` runs JS, ``key`` sends a real key press."""

    def __init__(self, binary: str, profile: Path, url: str) -> None:
        import fcntl

        def high(fd: int) -> int:                  # keep our pipe ends off fds 3 and 4
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            return moved

        cmd_r, cmd_w = (high(f) for f in os.pipe())
        res_r, res_w = (high(f) for f in os.pipe())
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=lambda: (os.dup2(cmd_r, 3), os.dup2(res_w, 4)))
        os.close(cmd_r)
        os.close(res_w)
        self.out, self.inp = os.fdopen(cmd_w, "wb", buffering=0), os.fdopen(res_r, "rb", buffering=0)
        self.buf, self.n, self.session = b"", 0, None
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.wait_for("document.readyState === 'complete' && !!window.__index")

    def send(self, method: str, params: dict | None = None) -> dict:
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        self.out.write(json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = self.inp.read(1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.n:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expr: str):
        return self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True})["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 20.0):
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(expr)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expr}")

    def key(self, key: str, code: str, text: str | None = None) -> None:
        down = {"type": "keyDown", "key": key, "code": code, **({"text": text} if text else {})}
        self.send("Input.dispatchKeyEvent", down)
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "code": code})

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", {"text": text})

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.out.close()
        self.inp.close()


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """A :class:`Chromium`; skips where /usr/bin/chromium is missing (install: apt-get install chromium)."""
    binary = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if not binary:
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run "
                    "the browser tests")
    return Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))


@pytest.fixture
def devtools(chromium, tmp_path):
    """Open a page under the DevTools protocol: ``devtools(url) -> DevTools`` (closed after the test)."""
    pages: list[DevTools] = []

    def open_page(url: str) -> DevTools:
        pages.append(DevTools(chromium.binary, tmp_path / f"profile{len(pages)}", url))
        return pages[-1]

    yield open_page
    for page in pages:
        page.close()
