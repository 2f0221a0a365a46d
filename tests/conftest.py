"""Shared fixtures: free ports, a throwaway PostgreSQL database, a real `mlflow server`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest


def pytest_configure(config):
    """Decoded datasets go to a cache of this session's own, not the user's ~/.cache/imbcil.

    The phase store is off unless a test turns it on: tests that train the same tiny config
    each check their own training, not a phase another test left behind.
    """
    import tempfile

    os.environ.setdefault("IMBCIL_CACHE", tempfile.mkdtemp(prefix="imbcil-test-cache-"))
    os.environ.setdefault("IMBCIL_PHASE_STORE", "off")
    # Under pytest-xdist the workers share the cores: a worker's torch (and the runs it starts
    # in subprocesses) takes its share of threads, not all of them, or the workers' thread
    # pools fight (two workers at two threads each ran the learners' tests 2x slower than one).
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))

# A test that uses one of these (directly or through another fixture) reads the real dataset, or
# starts a real MLflow server or Ray cluster: it is end to end, whether or not it says so.
E2E_FIXTURES = {"data_root", "mlflow_server", "cluster_kit"}


# Fixtures that build something costly once for many tests (a sweep, a cluster): under
# pytest-xdist (`--dist loadgroup`) the tests that use one run on one worker, so it is built once.
SHARED_FIXTURE_GROUPS = {"tiny_sweep": "tiny-sweep", "steady_sweep": "steady-sweep", "cluster": "two-node-cluster", "pg_server": "two-node-cluster"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks added here
def pytest_collection_modifyitems(items):
    """`pytest -m "not e2e"` leaves out every test that needs real data or real services.

    The longest work comes first (`slow` tests, then the shared-fixture groups, then the other
    end-to-end tests, then the unit tests), each kind in its collection order: pytest-xdist
    (`--no-loadscope-reorder`) hands work out in this order, and the short tests at the end
    fill whatever time one worker has left while the other finishes.
    """
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if E2E_FIXTURES & fixtures:
            item.add_marker(pytest.mark.e2e)
        groups = {SHARED_FIXTURE_GROUPS[name] for name in fixtures & SHARED_FIXTURE_GROUPS.keys()}
        if groups:
            (group,) = groups  # a test needs at most one of them
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item) -> int:
        if item.get_closest_marker("slow"):
            return 0
        if item.get_closest_marker("xdist_group"):
            return 1
        return 2 if item.get_closest_marker("e2e") else 3

    items.sort(key=rank)  # stable: each kind keeps its order, a group's tests theirs


POSTGRES_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
SERVER_START_TIMEOUT_S = 90.0
SERVER_STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it)."""
    (port,) = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """`count` different free ports: each socket stays bound until all are chosen, since the OS
    may hand a just-closed port out again (two of a Ray node's ports once came out equal)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@pytest.fixture
def unused_port() -> int:
    return free_port()


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create an empty database on the local PostgreSQL, yield its URI, drop it on exit."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(connect_timeout=3, **POSTGRES_ADMIN)
    except psycopg2.OperationalError as exc:
        reason = " ".join(str(exc).split())
        pytest.skip(f"PostgreSQL at {POSTGRES_ADMIN['host']}:{POSTGRES_ADMIN['port']} does not answer: {reason}")
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    name = f"imbcil_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{POSTGRES_ADMIN['user']}@{POSTGRES_ADMIN['host']}:{POSTGRES_ADMIN['port']}/{name}"
    finally:
        with admin.cursor() as cursor:
            # FORCE: a client that died uncleanly may still hold connections.
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def postgres_uri() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (skips when PostgreSQL is not there)."""
    with fresh_postgres_database() as uri:
        yield uri


@dataclass
class MlflowServer:
    url: str
    backend_store_uri: str
    artifacts_dir: Path
    log_path: Path
    process: subprocess.Popen


def _wait_healthy(server: MlflowServer) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mlflow server exited with {server.process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    tail = server.log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"mlflow server did not answer /health within {SERVER_START_TIMEOUT_S:g} s:\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's whole process group: its workers outlive a signal to the server alone."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = process.pid  # the leader is gone; its group id is still its pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        # Whatever is left (the leader or orphaned workers) is killed outright.
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=SERVER_STOP_TIMEOUT_S)


@pytest.fixture
def mlflow_server(tmp_path_factory) -> Iterator[Callable[..., MlflowServer]]:
    """Factory: `mlflow_server("sqlite")` or `mlflow_server("postgres")` starts a real server.

    Artifacts are proxied (`--artifacts-destination`), so clients upload over HTTP exactly as
    they would to a remote server. The postgres variant skips when PostgreSQL is not there.
    One exit stack holds databases and servers, so each server stops before its database is
    dropped (a separate `postgres_uri` fixture would be torn down first).
    """
    cleanup = contextlib.ExitStack()

    def start(backend: str = "sqlite") -> MlflowServer:
        root = tmp_path_factory.mktemp(f"mlflow-{backend}")
        if backend == "sqlite":
            store = f"sqlite:///{root / 'db.sqlite'}"
        elif backend == "postgres":
            store = cleanup.enter_context(fresh_postgres_database())
        else:
            raise ValueError(f"unknown backend {backend!r} (sqlite or postgres)")
        port = free_port()
        artifacts = root / "artifacts"
        log_path = root / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # The server's GenAI job runner starts eight more Python processes that tracking never
        # uses; on a small CI machine they double the start-up time.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--backend-store-uri", store,
            "--artifacts-destination", str(artifacts),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        cleanup.callback(_stop, process)
        server = MlflowServer(f"http://127.0.0.1:{port}", store, artifacts, log_path, process)
        _wait_healthy(server)
        return server

    with cleanup:
        yield start


# ----------------------------------------------------------------------------- offline datasets

PARQUET_NAME = "cifar10-jpeg.parquet"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The offline data folder: $IMBCIL_DATA, else `<repo>/../shared/data`; skips without the Parquet file."""
    configured = os.environ.get("IMBCIL_DATA")
    root = Path(configured).expanduser() if configured else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / PARQUET_NAME).is_file():
        where = "IMBCIL_DATA" if configured else "the default location"
        pytest.skip(f"offline CIFAR-10 not found: {root / PARQUET_NAME} ({where}) does not exist")
    return root


@pytest.fixture(scope="session")
def cifar10_raw(data_root: Path):
    """The decoded CIFAR-10 Parquet file (a few seconds to read), shared by the whole session."""
    from method.config import DataConfig
    from method.data import load_raw

    return load_raw(DataConfig(dataset="cifar10", root=str(data_root)))


# ----------------------------------------------------------------------------- servers that outlive one test


def launch_mlflow_server(root: Path, store: str, port: int | None = None) -> MlflowServer:
    """`mlflow server` as in the `mlflow_server` fixture, for fixtures of wider scope and restarts.

    The caller stops it with `stop_mlflow_server`; given the `port` of a stopped server (and
    its store), it comes back where clients expect it.
    """
    port = port or free_port()
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # see the `mlflow_server` fixture
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", store, "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", store, artifacts, log_path, process)
    try:
        _wait_healthy(server)
    except BaseException:
        _stop(process)
        raise
    return server


def stop_mlflow_server(server: MlflowServer) -> None:
    _stop(server.process)


# ----------------------------------------------------------------------------- a Ray cluster on this machine

RAY_NODE_START_TIMEOUT_S = 60.0


def session_processes(session: int) -> list[int]:
    """Pids of the live processes in a session: Ray's workers make their own process groups,
    but stay in the session of the `ray start` that launched their node."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(entry.name))
    return pids


def kill_session(session: int) -> None:
    """SIGKILL every process of a session (one Ray node and everything it started)."""
    for pid in session_processes(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen  # `ray start --block`, leader of its own session
    log_path: Path

    @property
    def session(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        kill_session(self.session)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)


@dataclass
class RayCluster:
    """A head and worker nodes on this machine, each `ray start` in its own session.

    `env` holds what a driver needs to join (the cluster uses token authentication, as Ray
    2.5x clusters do by default). Ray 2.60 replaces --node-ip-address 127.0.0.1 with the
    address of the machine's first interface for a multi-node cluster, so nodes listen there.
    """

    address: str
    env: dict[str, str]
    temp_dir: Path
    nodes: list[RayNode]

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    def node_of(self, pid: int) -> str | None:
        """Which node (by name) a live process belongs to."""
        try:
            session = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            return None
        return next((node.name for node in self.nodes if node.session == session), None)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.session, signal.SIGTERM)
        deadline = time.monotonic() + SERVER_STOP_TIMEOUT_S
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in self.nodes:
            node.kill()
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_ports() -> list[str]:
    """Every port a node listens on, chosen free: other clusters may run on this machine."""
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")  # fmt: skip
    return [text for flag, port in zip(flags, free_ports(len(flags))) for text in (flag, str(port))]


def start_ray_cluster(log_dir: Path, cpus: Sequence[int] = (2, 2)) -> RayCluster:
    """Start a head with cpus[0] CPUs and one worker node per further entry; wait until all join."""
    ray = str(Path(sys.executable).parent / "ray")
    # Short: Ray's unix sockets live under it, and socket paths are limited to 107 bytes.
    temp_dir = Path(f"/tmp/imbcil-ray-{uuid.uuid4().hex[:8]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    join_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
    env.update(join_env)
    # A dead node is noticed in a few seconds rather than Ray's default half minute.
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--min-worker-port", "0", "--max-worker-port", "0",
              "--temp-dir", str(temp_dir), "--disable-usage-stats", "--block"]  # fmt: skip
    cluster = RayCluster(f"127.0.0.1:{port}", join_env, temp_dir, [])

    def launch(name: str, args: list[str]) -> None:
        log_path = log_dir / f"ray-{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [ray, "start", *args, *_ray_ports(), *common], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        cluster.nodes.append(RayNode(name, process, log_path))

    try:
        launch("head", ["--head", "--port", str(port), "--include-dashboard=false", "--num-cpus", str(cpus[0])])
        _wait_for(lambda: _answers(port), cluster.head, "the Ray head's GCS port")
        for index, count in enumerate(cpus[1:], start=1):
            launch(f"worker{index}", ["--address", cluster.address, "--num-cpus", str(count)])
        _wait_for(lambda: _alive_nodes(cluster) == len(cpus), cluster.nodes[-1], f"{len(cpus)} alive Ray nodes")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive_nodes(cluster: RayCluster) -> int:
    """Alive nodes as `ray list nodes` would say, asked in a child: this process stays free of Ray."""
    script = "import ray, logging; ray.init(address=%r, logging_level=logging.ERROR); print(sum(n['Alive'] for n in ray.nodes()))"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **cluster.env}
    try:
        done = subprocess.run([sys.executable, "-c", script % cluster.address], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return 0
    lines = done.stdout.split()
    return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else 0


def _wait_for(predicate: Callable[[], bool], node: RayNode, what: str) -> None:
    deadline = time.monotonic() + RAY_NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"ray start ({node.name}) exited with {node.process.returncode}:\n{node.log_path.read_text()[-3000:]}")
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"no {what} within {RAY_NODE_START_TIMEOUT_S:g} s:\n{node.log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def cluster_kit():
    """The helpers above, for test modules (which cannot import this file): wider-scoped
    fixtures start and restart servers and clusters with them."""
    from types import SimpleNamespace

    return SimpleNamespace(
        launch_mlflow_server=launch_mlflow_server, stop_mlflow_server=stop_mlflow_server,
        fresh_postgres_database=fresh_postgres_database, start_ray_cluster=start_ray_cluster,
        session_processes=session_processes, free_port=free_port,
    )  # fmt: skip
