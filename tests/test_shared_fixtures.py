"""tests/shared_fixtures.py: a fixture made once per run is made by one process; another process that asks
meanwhile waits on the lock and gets the same value without making it; a failed make is made again."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from shared_fixtures import SHARED_ENV, made_once

TESTS = Path(__file__).parent

# A second process asking for fixture "x": its own make would fail the test, so it must get the first's value.
ASK = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from shared_fixtures import made_once

def make(folder):
    raise SystemExit("made a second time")

print(made_once("x", make), end="")
"""


def blocked_on_flock(pid: int) -> bool:
    """True when process ``pid`` waits for an flock lock (a ``->`` line of /proc/locks)."""
    lines = Path("/proc/locks").read_text().splitlines()
    return any(f"-> FLOCK  ADVISORY  WRITE {pid} " in line for line in lines)


def wait_blocked(proc: subprocess.Popen, seconds: float = 60.0) -> None:
    """Return once ``proc`` waits for an flock lock; fail if it ends first or does not within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not blocked_on_flock(proc.pid):
        assert proc.poll() is None, f"the second process ended without waiting for the lock: {proc.communicate()}"
        assert time.monotonic() < deadline, f"the second process did not wait for the lock within {seconds:g} s"
        time.sleep(0.01)


def test_made_once_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))
    made: list[Path] = []
    second: list[subprocess.Popen] = []

    def make(folder: Path) -> str:
        made.append(folder)
        # the other process asks while this one makes: it must wait on the lock, not make it too
        second.append(subprocess.Popen([sys.executable, "-c", ASK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True))
        wait_blocked(second[0])
        (folder / "made").write_text("here")
        return str(folder / "made")

    value = made_once("x", make)
    out, err = second[0].communicate()
    assert second[0].returncode == 0, err
    assert out == value == str(tmp_path / "x" / "made") and made == [tmp_path / "x"]
    assert made_once("x", make) == value and len(made) == 1  # and later calls in this process neither


def test_failed_make_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))

    def fail(folder: Path) -> str:
        raise RuntimeError("harvest failed")

    with pytest.raises(RuntimeError, match="harvest failed"):
        made_once("y", fail)
    assert made_once("y", lambda folder: "second try") == "second try"
    assert made_once("y", fail) == "second try"
