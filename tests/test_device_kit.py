"""The device kit carries exactly what the lent GPU machine's image lacks (bench/device_kit.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.device_kit import DEVICE_IMAGE, missing, normalized

REPO = Path(__file__).resolve().parents[1]


def test_what_the_image_has_is_never_carried_and_names_compare_as_pep_503_says() -> None:
    imported = {"torch": "2.14.1", "Jinja2": "3.1", "huggingface_hub": "2.4.0", "zarr": "3.1.6",
                "eai_sparsify": "1.3.3", "Pydantic-Core": "2.50.5", "dynsae": "0.1.0"}
    image = frozenset({"torch", "jinja2", "huggingface-hub", "pydantic"})
    # the image's torch, jinja2 and hub are used as they are there; this project travels as the working tree
    assert missing(imported, image) == {"Pydantic-Core": "2.50.5", "eai_sparsify": "1.3.3", "zarr": "3.1.6"}
    assert normalized("Typing_Extensions") == normalized("typing.extensions") == "typing-extensions"


def test_the_image_list_holds_what_the_check_must_not_shadow() -> None:
    for name in ("torch", "numpy", "transformers", "triton", "numba", "huggingface-hub", "safetensors"):
        assert name in DEVICE_IMAGE, name


def test_the_device_script_says_what_to_do_without_a_kit(tmp_path) -> None:
    """No wheels packed: one sentence naming the command that packs them, exit 2, nothing run."""
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    (tree / "bench" / "device_check.sh").write_text((REPO / "bench" / "device_check.sh").read_text())
    done = subprocess.run(["bash", str(tree / "bench" / "device_check.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: no wheels in .whl/; run `python -m bench.device_kit` on the development "
                                   "machine and carry .whl.")
    assert not (tmp_path / "out").exists()
