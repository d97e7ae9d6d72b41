"""The device kit: the wheels a lent GPU machine needs to run ``python -m bench gpu``, packed here.

A lent machine (bench/README, "Prepared GPU check") runs an image of its own: CPython 3.12 with PyTorch,
transformers, numpy, numba and the other packages of :data:`DEVICE_IMAGE`, and it reaches nothing outside
itself. The check imports a few dozen distributions more (zarr, pydantic, sae-lens, eai-sparsify, ...), and
a lease is minutes long, once. So the kit is packed before any lease:

1. here, ``python -m bench.device_kit`` runs the quick CPU check in a child process that records the
   distributions it imported (``bench gpu --record-distributions``), keeps those the image lacks
   (:func:`missing`; this project itself travels as the working tree), and downloads them at the versions
   installed here (the lock's) as CPython 3.12 manylinux wheels into ``.whl/`` (git-ignored), checking that
   they fit beside the working tree in what one call carries (:data:`CARRY_LIMIT`);
2. there, ``bash bench/device_check.sh`` installs them without an index or dependencies into /tmp/site,
   puts that on ``PYTHONPATH`` and runs the check; its JSON and log land in ``$OUT``.

The image's own packages are used as they are there (its torch 2.11, transformers 5.17, numpy 2.5 on
2026-11-17, not this lock's): only what it lacks is carried, so nothing of the image is shadowed.
``--python-version`` / ``--dest`` pack for another interpreter (a rehearsal on this machine with 3.11).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The distributions of the lent machines' image ("cuda", CPython 3.12) as the device tool's notes listed them
#: on 2026-11-17: used there as they are, never carried.
DEVICE_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split())
DEVICE_PYTHON = "3.12"
#: What one device call carries: the working tree and the carried paths together (the device tool's limit).
CARRY_LIMIT = 64 << 20
#: manylinux tags pip must be told one by one to fetch wheels for another machine.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
PROJECT = "dynsae"


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Eai_Sparsify`` and ``eai-sparsify`` are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def missing(imported: dict[str, str], image: frozenset[str] = DEVICE_IMAGE) -> dict[str, str]:
    """The distributions of ``imported`` (name → version) that the image lacks, this project left out."""
    have = {normalized(name) for name in image} | {PROJECT}
    return {name: version for name, version in sorted(imported.items()) if normalized(name) not in have}


def record_imports() -> dict[str, str]:
    """The distributions (name → version) the quick CPU check imports, from a child process."""
    with tempfile.TemporaryDirectory(prefix="devkit") as tmp:
        dists = Path(tmp) / "dists.json"
        cmd = [sys.executable, "-m", "bench", "gpu", "--device", "cpu", "--quick", "--out", str(Path(tmp) / "gpu.json"),
               "--record-distributions", str(dists)]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        return json.loads(dists.read_text())


def download(pins: dict[str, str], dest: Path, python_version: str) -> list[Path]:
    """The wheels of ``pins`` for CPython ``python_version`` on x86-64 Linux, in ``dest`` (emptied first)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--dest", str(dest)]
    for tag in PLATFORMS:
        cmd += ["--platform", tag]
    subprocess.run(cmd + [f"{name}=={version}" for name, version in pins.items()], check=True)
    return sorted(dest.glob("*.whl"))


def tree_bytes() -> int:
    """Bytes of the working tree's tracked files (what a device call sends besides the carried paths)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in names if name and (REPO / name.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_kit", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(REPO / ".whl"), help="the wheel folder (default: .whl, carried)")
    parser.add_argument("--python-version", default=DEVICE_PYTHON, help="the interpreter the wheels are for")
    parser.add_argument("--dry-run", action="store_true", help="list what would be carried, download nothing")
    args = parser.parse_args(argv)
    print("recording what the quick check imports ...", flush=True)
    imported = record_imports()
    pins = missing(imported)
    print(f"{len(imported)} distributions imported; the image lacks {len(pins)}: "
          + ", ".join(f"{name}=={version}" for name, version in pins.items()))
    if args.dry_run:
        return 0
    wheels = download(pins, Path(args.dest), args.python_version)
    size, tree = sum(w.stat().st_size for w in wheels), tree_bytes()
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}; with the working tree "
          f"({tree / 2**20:.1f} MiB) {(size + tree) / 2**20:.1f} MiB of the {CARRY_LIMIT >> 20} MiB a call carries")
    if size + tree > CARRY_LIMIT:
        print(f"error: the kit and the working tree are {(size + tree) / 2**20:.1f} MiB, over the "
              f"{CARRY_LIMIT >> 20} MiB one device call carries; run the check's parts in separate calls "
              "(bench gpu --only) with the wheels each needs.", file=sys.stderr)
        return 1
    print('on the lent machine: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=480)')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
