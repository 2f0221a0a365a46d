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

POSTGRES_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
SERVER_START_TIMEOUT_S = 90.0
SERVER_STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
