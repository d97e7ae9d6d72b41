"""Ray for the project's jobs (harvest and sweep): start or join it, wait on it with Ctrl-C honoured,
and leave nothing running. The one module that calls ``ray.init``.

* :func:`ray_session` joins the cluster at ``address`` (else the job's, ``RAY_ADDRESS``), uses a Ray
  this process already initialised as it is, or starts a local instance: the dashboard on 127.0.0.1
  only and without its web UI, no Ray client server, its own short temp dir (under ``RAY_TMPDIR``, else ``/tmp``), and Ray's own
  authentication default, which for a local ``ray.init`` in Ray ≥ 2.59 is token authentication
  (``RAY_AUTH_MODE`` unset: Ray generates ``~/.ray/auth_token`` and every RPC must carry it; the
  project never sets ``RAY_AUTH_MODE``, only a test environment does). Ray 2.60 maps a requested node
  address of 127.0.0.1 to the machine's routable address and its GCS, raylet and worker RPC servers
  listen on every interface whatever node address they are given, so the token is what keeps other
  hosts out; clusters are set up as ``deploy/README.md`` says (token authentication, its setting in
  ``deploy/ray-cluster.yaml`` and ``deploy/rayjob.yaml``).
* Credentials and settings the workers need (``AWS_*``, ``HF_*``, ``TRANSFORMERS_*``, ``TOKENIZERS_*``)
  are never task or actor arguments. A local instance's workers inherit this process's environment
  (the raylet is its child); on a Ray this session did not start, :meth:`RaySession.options` puts the
  driver's values in the actors' and tasks' runtime environment (``runtime_env={"env_vars": ...}``).
  Ray's runtime-env agent logs those values in the cluster's session logs: on a shared cluster give
  the nodes their own credentials (instance role, Kubernetes secret) and leave them out of the driver.
* SIGINT / SIGTERM inside the session set a flag (:func:`catch_interrupts`) instead of interrupting
  whatever C call the main thread is in; the driver only ever waits in short slices
  (:meth:`RaySession.wait_one`, :meth:`RaySession.get`), so a signal is seen within
  :data:`WAIT_SLICE_S` and raises :class:`Interrupted`. A second signal during the clean-up only sets
  the flag again: the clean-up is never cut short.
* However the session ends, :meth:`RaySession.close` kills every actor it tracked, force-cancels the
  tasks it was told about (waiting until they have ended when Ray is shared), and shuts down a local
  instance it started, waiting for each of its processes to exit (killing what is left after
  :data:`STOP_TIMEOUT_S`) and removing its temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from store.errors import UserError

#: How long the driver blocks in one ``ray.wait`` before it looks at the signal flag again.
WAIT_SLICE_S = 0.5
#: Per step of stopping (cancelled tasks ending, a local instance's processes exiting).
STOP_TIMEOUT_S = 10.0
#: Tries to start a local instance (Ray's own startup timeout is fixed; a loaded machine can exceed it).
START_ATTEMPTS = 2
#: Environment the workers need from the driver when they do not inherit it (see the module docstring).
WORKER_ENV_PREFIXES = ("AWS_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM reached the driver; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message or signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Interrupts:
    """The signal flag the driver's waits look at."""

    signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def catch_interrupts() -> Iterator[Interrupts]:
    """SIGINT / SIGTERM set a flag inside the block; the previous handlers are back afterwards. Off the
    main thread (no handlers possible) the flag stays unset."""
    flag = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: Any) -> None:
        flag.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def worker_env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's settings the workers need: object-store credentials and endpoint, model-hub settings."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(WORKER_ENV_PREFIXES)}


def _amounts(resources: dict[str, float], keys: list[str]) -> str:
    """``CPU 2, GPU 0`` for ``keys`` of ``resources`` (0 where absent)."""
    return ", ".join(f"{k} {resources.get(k, 0.0):g}" for k in keys)


def unmet_demand(demands: list[tuple[str, dict[str, float]]], nodes: list[dict[str, float]],
                 single_node: bool) -> tuple[str, dict[str, float]] | None:
    """What cannot be placed: ``(what, its demand)``, or None when everything can. ``demands`` are (noun,
    resources one actor or task asks for), one per actor or task; ``nodes`` the resources of each live
    node. On a cluster each demand must fit some node by itself; on a single node that nothing will join,
    all of them together must fit it (a feeder reserving every CPU leaves none for its trainers)."""
    demands = [(what, {k: v for k, v in d.items() if v > 0}) for what, d in demands]

    def fits(demand: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) >= v - 1e-9 for k, v in demand.items())

    if single_node:
        total: dict[str, float] = {}
        for _, demand in demands:
            for k, v in demand.items():
                total[k] = total.get(k, 0.0) + v
        counts = Counter(what for what, _ in demands)
        what = " and ".join(f"{n} {noun}{'s' if n > 1 else ''}" for noun, n in counts.items())
        return None if any(fits(total, node) for node in nodes) else (what, total)
    return next(((f"a {what}", d) for what, d in demands if not any(fits(d, node) for node in nodes)), None)


@dataclass
class RaySession:
    """Ray as one job uses it; see the module docstring. Build it with :func:`ray_session`."""

    ray: Any
    started: bool = False  # this session started a local instance (and stops it)
    connected: bool = False  # this session called ray.init (and calls ray.shutdown)
    temp_dir: str | None = None
    flag: Interrupts = field(default_factory=Interrupts)
    env_vars: dict[str, str] = field(default_factory=dict)  # sent through the runtime env (see options)
    actors: list[Any] = field(default_factory=list)
    tasks: list[Any] = field(default_factory=list)
    closed: bool = False

    # ------------------------------------------------------------------ work
    def options(self, **placement: Any) -> dict[str, Any]:
        """Options for ``.options(...)`` of an actor class or remote function: ``placement`` plus the
        runtime environment that carries the driver's settings to workers that do not inherit them."""
        if self.env_vars:
            placement["runtime_env"] = {"env_vars": dict(self.env_vars)}
        return placement

    def check_demands(self, demands: list[tuple[str, dict[str, float]]], fix: str) -> None:
        """Make sure every actor or task in ``demands`` ((noun, resources it asks for)) can be placed: Ray
        would otherwise keep it pending forever. On a local instance this session started (one node that
        nothing will join) they must fit it together, else :class:`UserError` names what asks for what and
        ``fix``; on a cluster each must fit some live node, else a warning (an autoscaler may add one)."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        unmet = unmet_demand(demands, nodes, single_node=self.started)
        if unmet is None:
            return
        what, demand = unmet
        keys = sorted(demand)
        if self.started:
            asks = f"ask for {_amounts(demand, keys)} together" if len(demands) > 1 else f"asks for {_amounts(demand, keys)}"
            raise UserError(f"{what} {asks} but the local Ray instance has "
                            f"{_amounts(nodes[0] if nodes else {}, keys)}, so nothing would ever run; {fix}")
        warnings.warn(f"no node of the Ray cluster offers what {what} asks for ({_amounts(demand, keys)}) now: "
                      f"it waits until such a node joins (an autoscaler adds one); otherwise {fix}",
                      RuntimeWarning, stacklevel=2)

    def track(self, actor: Any) -> Any:
        """Record ``actor`` so that :meth:`close` kills it; returns it."""
        self.actors.append(actor)
        return actor

    def track_task(self, ref: Any) -> Any:
        """Record a task's ObjectRef (or streaming generator) so that :meth:`close` cancels it; returns it."""
        self.tasks.append(ref)
        return ref

    def forget_task(self, ref: Any) -> None:
        """A task that has ended needs no cancelling."""
        with contextlib.suppress(ValueError):
            self.tasks.remove(ref)

    def kill(self, actor: Any) -> None:
        """Kill ``actor`` now (no restart), e.g. to free a finished run's CPU/GPU slot."""
        with contextlib.suppress(ValueError):
            self.actors.remove(actor)
        if isinstance(actor, self.ray.actor.ActorHandle):
            with contextlib.suppress(Exception):  # already dead, or Ray already gone: nothing left to kill
                self.ray.kill(actor, no_restart=True)

    def wait_one(self, refs: list[Any]) -> Any:
        """The first of ``refs`` to be ready, waiting in short slices so that a signal is seen within one."""
        while True:
            self.flag.check()
            done, _ = self.ray.wait(refs, num_returns=1, timeout=WAIT_SLICE_S)
            if done:
                return done[0]

    def get(self, ref: Any) -> Any:
        """``ray.get(ref)`` that gives way to a signal."""
        return self.ray.get(self.wait_one([ref]))

    # ------------------------------------------------------------------ stop
    def close(self) -> None:
        """Kill the tracked actors, cancel the tracked tasks, and stop a local instance this session
        started (every process of it gone, its temp dir removed). Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        for actor in list(self.actors):
            self.kill(actor)
        tasks, self.tasks = list(self.tasks), []
        for ref in tasks:  # force: the worker process is killed, so no write of it continues
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        if not self.connected:
            _wait_cancelled(self.ray, tasks)  # a shared Ray stays up: wait until each task has ended
            return
        family = _local_processes(self.temp_dir) if self.started else []
        with contextlib.suppress(Exception):
            self.ray.shutdown()
        _stop_processes(family)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _wait_cancelled(ray: Any, tasks: list[Any]) -> None:
    """Wait (bounded) until each force-cancelled task has ended; a streaming generator ends when its
    next item raises."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for ref in tasks:
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline:
                item = next(ref) if hasattr(ref, "__next__") else ref
                ray.get(item, timeout=max(0.1, deadline - time.monotonic()))
                if item is ref:
                    break


def _local_processes(temp_dir: str | None) -> list[Any]:
    """The processes of the local instance: this process's children started in ``temp_dir`` (GCS,
    raylet, agents, log monitor) and everything they started (the workers)."""
    import psutil

    if temp_dir is None:
        return []
    family = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in child.cmdline()):
                family += [child, *child.children(recursive=True)]
    return family


def _stop_processes(family: list[Any]) -> None:
    """Wait for ``family`` to exit (Ray's workers outlive the raylet by a moment); kill what is left."""
    import psutil

    _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)


def start_or_join(address: str | None = None, *, address_key: str = "ray address") -> RaySession:
    """Connect to ``address`` (or ``RAY_ADDRESS``), use a Ray already initialised in this process, or
    start a local instance; see the module docstring. ``address_key`` names the setting in errors."""
    import ray

    if ray.is_initialized():
        return RaySession(ray, env_vars=worker_env_vars())
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as err:
            raise UserError(f"cannot reach the Ray cluster at {address_key} = {address!r} ({err}); start it or "
                            "fix the address.") from None
        return RaySession(ray, connected=True, env_vars=worker_env_vars())
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    attempt = 1
    while True:
        temp_dir = tempfile.mkdtemp(prefix="ray", dir=os.environ.get("RAY_TMPDIR") or "/tmp")  # short: socket paths
        try:
            ray.init(include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=False, _temp_dir=temp_dir)
            return RaySession(ray, started=True, connected=True, temp_dir=temp_dir)
        except BaseException as err:
            with contextlib.suppress(Exception):
                ray.shutdown()
            _stop_processes(_local_processes(temp_dir))  # what this attempt started, and its temp dir
            shutil.rmtree(temp_dir, ignore_errors=True)
            # Ray gives a starting node a fixed 30 s to register, which a loaded machine can exceed: retry that
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                raise
            attempt += 1


@contextlib.contextmanager
def ray_session(address: str | None = None, *, address_key: str = "ray address") -> Iterator[RaySession]:
    """:func:`start_or_join`, with SIGINT / SIGTERM caught (after ``ray.init``, which installs handlers
    of its own) until the session is closed; closed however the block ends."""
    session = start_or_join(address, address_key=address_key)
    with catch_interrupts() as flag:
        session.flag = flag
        try:
            yield session
        finally:
            session.close()
