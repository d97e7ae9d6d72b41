"""One pinned environment: requirements.lock, make install, deploy/Dockerfile and deploy/rayjob.yaml agree;
and ``python -m bench`` finds the benchmarks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def locked() -> dict[str, str]:
    """name (normalised) -> pinned version of every requirement in the lock."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", LOCK.read_text(), flags=re.M)
    return {normalise(name): version for name, version in pins}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return normalise(re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0])


def test_the_lock_pins_every_dependency_and_extra_with_hashes():
    pins = locked()
    text = LOCK.read_text()
    assert text.startswith("# ") and "make lock" in text.split("\n\n")[0]  # the header says how it is made
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 4)[-1])
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, the locked interpreter
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"sae-lens", "eai-sparsify"} <= {requirement_name(s) for s in extras["interop"]}
    assert {requirement_name(s) for s in extras["interop"]} <= {requirement_name(s) for s in extras["dev"]}
    wanted = [*project["dependencies"], *extras["dev"], *extras["demo"], *extras["interop"]]
    missing = sorted({requirement_name(s) for s in wanted} - set(pins))
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"


def test_make_install_and_the_dockerfile_install_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*--require-hashes -r \$\(LOCK\)", makefile)
    assert "LOCK := requirements.lock" in makefile
    assert re.search(r"pip install .*--no-deps -e \.", makefile)
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", docker, flags=re.M).group(1)
    assert base.startswith("python:3.11"), f"the image's torch must come from the lock, not from {base}"
    assert re.search(r"^COPY requirements\.lock ", docker, flags=re.M)
    installs = re.findall(r"pip install [^\n&]*", docker)
    assert any("--require-hashes -r requirements.lock" in line for line in installs)
    # everything else is installed without resolving again, so torch and ray stay the locked ones
    assert all("--no-deps" in line or "-r requirements.lock" in line for line in installs)


def test_rayjob_runs_the_locked_ray():
    pins = locked()
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"]
    text = (REPO / "deploy" / "rayjob.yaml").read_text()
    for tag in re.findall(r"rayproject/ray(?:-ml)?:([0-9][^\s\"'-]*)", text):  # any Ray image must match too
        assert tag == pins["ray"]
    assert pins["torch"].split("+")[0] == pins["torch"]  # the PyPI wheel (CUDA libraries bundled)


def test_the_running_environment_is_the_locked_one():
    """`make test` runs in what `make install` made: torch and ray as pinned."""
    import ray
    import torch

    pins = locked()
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert ray.__version__ == pins["ray"]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_bench_lists_every_benchmark_and_passes_arguments_through():
    listed = run_bench("--list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(p.stem.removesuffix("_bench") for p in (REPO / "bench").glob("*_bench.py"))
    assert "store" in names and all(len(line.split(None, 1)) == 2 for line in listed.stdout.splitlines())
    helped = run_bench("store", "--help")  # argument parsing only: nothing is timed
    assert helped.returncode == 0 and "--quick" in helped.stdout and "usage: store_bench.py" in helped.stdout
    wrong = run_bench("store", "--no-such-option")
    assert wrong.returncode == 2 and "unrecognized arguments: --no-such-option" in wrong.stderr
    unknown = run_bench("nope")
    assert unknown.returncode == 2 and "invalid choice: 'nope'" in unknown.stderr
