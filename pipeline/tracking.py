"""MLflow tracking: one `RunTracker` per MLflow run, plus the checks and links around it.

Everything goes through `MlflowClient` with an explicit tracking URI, never through the fluent
`mlflow.start_run` API: the fluent API keeps one active run per process, while a sweep driver
holds a parent run and several trial runs at once. The verbs `run`, `sweep` and `reproduce`
all log through this module, so it knows runs, phases and configs, but no verb.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import functools
import getpass
import importlib.metadata
import io
import logging
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from method.config import RunConfig, protocol_name
from method.metrics import VALIDATION_METRIC_VERSION
from method.results import PhaseResult
from pipeline.config import ConfigError, dump_yaml, flatten
from pipeline.names import (
    DEFAULT_TRACKING_URI,
    ERROR_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_TAG,
    LAST_PHASE_TAG,
    PARENT_RUN_TAG,
    RUN_KEY_TAG,
    USER_TAG,
    VALIDATION_METRIC_TAG,
    phase_from_tag,
)
from pipeline.runtime import scoped_env, shorten

logger = logging.getLogger(__name__)

# MLflow prints "View run ... at <tracking URI>" whenever a run ends through a client, with the
# URI's credentials; every process that tracks imports this module, and the verbs print their own
# redacted links (`run_url`). A user who wants MLflow's line can still set the variable to false.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

# MLflow 3 accepts 6000-character param values, but older servers stop at 500; a config value
# that long is a list or a path, and its prefix still identifies it.
PARAM_VALUE_LIMIT = 500
TAG_VALUE_LIMIT = 5000
ERROR_MESSAGE_LIMIT = 500
# log_batch takes at most 100 params or tags, and 1000 metrics, per request.
_BATCH_LIMIT = 100
_METRIC_BATCH_LIMIT = 1000
_VERSIONED_PACKAGES = ("torch", "torchvision", "mlflow", "ray", "optuna")
_SECRET_QUERY = re.compile(
    r"([?&;](?:password|passwd|pwd|secret|token|access_token|api_key|apikey)=)[^&;#]*", re.IGNORECASE
)
_EMBEDDED_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#:@]*):[^\s/?#]*@")
# `password=...` anywhere in free text: libpq DSNs ("host=db password=x"), query strings, env dumps.
_SECRET_ASSIGNMENT = re.compile(
    r"(\b(?:password|passwd|pwd|secret|token|access_token|api_key|apikey)=)[^\s&;,'\"]+", re.IGNORECASE
)
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*)(.*)$", re.DOTALL)


class TrackingError(RuntimeError):
    """The tracking store is unusable or refused an operation; the message is one line."""


# ---------------------------------------------------------------------------------------------
# URIs


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """The CLI's --tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite file in the working dir."""
    for candidate in (cli_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        if candidate and candidate.strip():
            return candidate.strip()
    return DEFAULT_TRACKING_URI


def redact_uri(uri: str | None) -> str:
    """The URI with any password (userinfo or query parameter) replaced by `***`, safe to print."""
    if not uri:
        return "" if uri is None else uri
    text = str(uri)
    match = _AUTHORITY.match(text)
    if match:
        scheme, authority, rest = match.groups()
        if "@" in authority:
            # rsplit: an unencoded '@' inside the password must not leak its tail.
            userinfo, host = authority.rsplit("@", 1)
            if ":" in userinfo:
                authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
        text = scheme + authority + rest
    return _SECRET_QUERY.sub(r"\1***", text)


def redact_text(text: Any) -> str:
    """Free text (an error message, a config value, YAML) with every embedded password as `***`.

    Anything that may hold a URI passes through here before it is logged or printed: exception
    messages quote the URLs they called, credentials and all.
    """
    redacted = _EMBEDDED_PASSWORD.sub(r"\1:***@", str(text))
    return _SECRET_ASSIGNMENT.sub(r"\1***", redacted)


def error_tag_value(error: Any) -> str:
    """What a run's error tag holds: one line, passwords redacted (messages quote URLs with credentials)."""
    return shorten(redact_text(error), ERROR_MESSAGE_LIMIT)


def _without_userinfo(uri: str) -> str:
    """A clickable form of an http(s) URI: the browser asks for credentials itself."""
    match = _AUTHORITY.match(uri)
    if not match:
        return redact_uri(uri)
    scheme, authority, rest = match.groups()
    return redact_uri(scheme + authority.rsplit("@", 1)[-1] + rest)


def _scheme(uri: str) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    # A Windows drive letter looks like a one-letter scheme.
    return "" if len(scheme) == 1 else scheme.split("+", 1)[0]


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for an in-memory database)."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    rest = rest.split("?", 1)[0]
    if not rest.startswith("/"):
        return None
    path = rest[1:]  # sqlite:///rel.db -> rel.db; sqlite:////abs.db -> /abs.db
    if path in ("", ":memory:"):
        return None
    return Path(urllib.parse.unquote(path))


def _is_http(uri: str) -> bool:
    return _scheme(uri) in ("http", "https")


def run_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where to look at a run (or, without run_id, the experiment's run table) in the MLflow UI.

    For a local store there is no server, so the answer is the command that starts one and the
    address it will serve. `workflowType=machine_learning` opens MLflow 3's "Model training"
    view (runs, with a sweep's trials nested under it) rather than its GenAI workspace.
    """
    fragment = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "") + "?workflowType=machine_learning"
    if _is_http(tracking_uri):
        return f"{_without_userinfo(tracking_uri).rstrip('/')}/{fragment}"
    store = tracking_uri
    db_path = _sqlite_path(tracking_uri) if _scheme(tracking_uri) == "sqlite" else None
    if db_path is not None:
        # Absolute, so the hint works from any directory.
        store = f"sqlite:///{db_path.absolute()}"
    return f"mlflow ui --backend-store-uri {redact_uri(store)}  then open http://127.0.0.1:5000/{fragment}"


# ---------------------------------------------------------------------------------------------
# Checking the store


def _short_reason(exc: BaseException, timeout_s: float | None = None) -> str:
    """One short line saying why a connection or store operation failed."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, (TimeoutError, socket.timeout)) and timeout_s is not None:
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, MlflowException):
        text = exc.message
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc)
    # Library messages may quote the URL they called, credentials and all.
    return shorten(redact_text(text), 300) or type(exc).__name__


def check_tracking(uri: str, timeout_s: float = 5, *, read_only: bool = False) -> None:
    """Fail fast, with one line, when the tracking store cannot be used.

    For a local or database store this also creates the store's schema, once, here: parallel
    trials that each opened a fresh SQLite file would race on MLflow's schema migration.
    `read_only` (a dry run) checks that the store could be written and changes nothing in it.
    """
    scheme = _scheme(uri)
    try:
        with _quiet_schema_setup():
            if read_only:
                _check_store_read_only(uri, scheme, timeout_s)
            else:
                _check_store(uri, scheme, timeout_s)
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"tracking store {redact_uri(uri)} is not usable: {_short_reason(exc, timeout_s)}") from exc


@contextlib.contextmanager
def _quiet_schema_setup() -> Iterator[None]:
    """MLflow logs its schema creation and migration steps at INFO; a CLI prints one line or none."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _check_store(uri: str, scheme: str, timeout_s: float) -> None:
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri)
        MlflowClient(uri).search_experiments(max_results=1)
    elif scheme in ("", "file"):
        _check_writable_dir(Path(urllib.parse.urlsplit(uri).path if scheme else uri), uri)
        MlflowClient(uri).search_experiments(max_results=1)
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_database(uri, timeout_s)
        MlflowClient(uri).search_experiments(max_results=1)
    else:
        MlflowClient(uri).search_experiments(max_results=1)


def _check_store_read_only(uri: str, scheme: str, timeout_s: float) -> None:
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)  # a health probe and a search: reads only
    elif scheme == "sqlite":
        _check_sqlite(uri)  # the folder and the file's permissions, without creating either
    elif scheme in ("", "file"):
        _check_writable_dir(Path(urllib.parse.urlsplit(uri).path if scheme else uri), uri)
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_database(uri, timeout_s)  # one connection, no schema set-up


def _unreachable(uri: str, reason: str) -> TrackingError:
    return TrackingError(f"tracking server {redact_uri(uri)} is not reachable: {reason}")


def _check_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    match = _AUTHORITY.match(url)
    headers = {}
    if match and "@" in match.group(2):
        # urllib does not take credentials from the URL; MLflow's client (requests) does.
        userinfo, host = match.group(2).rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        url = match.group(1) + host + match.group(3)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as reply:
            reply.read(256)
    except urllib.error.HTTPError as exc:
        raise _unreachable(uri, f"{redact_uri(url)} answered {_short_reason(exc)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _unreachable(uri, _short_reason(exc, timeout_s)) from None
    # /health answers without credentials; the API call shows that the client may log.
    try:
        # MLflow's REST client retries for minutes by default; a probe must fail in seconds.
        with scoped_env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s)))}):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise _unreachable(uri, _short_reason(exc, timeout_s)) from None


def _check_writable_dir(path: Path, uri: str) -> None:
    from pipeline.runtime import unwritable_ancestor

    blocker = unwritable_ancestor(path)
    if blocker is not None:
        raise TrackingError(f"tracking store {redact_uri(uri)} is not usable: directory {blocker} is not writable")


def _check_sqlite(uri: str) -> None:
    path = _sqlite_path(uri)
    if path is None:
        return
    _check_writable_dir(path.absolute().parent, uri)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise TrackingError(f"tracking store {redact_uri(uri)} is not usable: {path} is not writable")


def _check_database(uri: str, timeout_s: float) -> None:
    """One plain connection first: MLflow's own engine setup retries for about 100 s."""
    parts = urllib.parse.urlsplit(uri)
    default_ports = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
    host, port = parts.hostname or "localhost", parts.port or default_ports[_scheme(uri)]
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise _unreachable(uri, _short_reason(exc, timeout_s)) from None
    import sqlalchemy

    try:
        # psycopg2 and the MySQL drivers wait for a silent server for minutes without this.
        connect_args = {"connect_timeout": max(1, math.ceil(timeout_s))} if _scheme(uri) != "mssql" else {}
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    except ModuleNotFoundError as exc:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, not psycopg2.
        hint = " (for psycopg2 write postgresql+psycopg2://)" if uri.startswith("postgresql:") else ""
        raise TrackingError(
            f"tracking store {redact_uri(uri)} is not usable: database driver {exc.name!r} is not installed{hint}"
        ) from None
    try:
        with engine.connect():
            pass
    except Exception as exc:
        reason = getattr(exc, "orig", None) or exc
        raise _unreachable(uri, _short_reason(reason, timeout_s)) from None
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Experiments


def _local_artifact_location(tracking_uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file.

    MLflow's default would be ./mlruns of whichever directory the first process ran in, which
    scatters one store's artifacts over working directories.
    """
    if _scheme(tracking_uri) != "sqlite":
        return None
    path = _sqlite_path(tracking_uri)
    if path is None:
        return None
    # Runs write under <location>/<run_id>, so two names that map to one folder cannot clash.
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100] or "experiment"
    return (path.absolute().parent / "mlruns" / folder).as_uri()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment called `name`, created (and tagged for the training view) if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=_local_artifact_location(client.tracking_uri, name),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException as exc:
            # Another process (a parallel trial) created it first.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or choose another name"
        )
    return experiment.experiment_id


# ---------------------------------------------------------------------------------------------
# Run metadata


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def environment_tags() -> dict[str, str]:
    """Versions that decide whether a number can be reproduced; missing packages are left out."""
    tags = {"version.python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = _git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


def _tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= TAG_VALUE_LIMIT else text[: TAG_VALUE_LIMIT - 3] + "..."


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


VALIDATION_METRIC_MEANINGS = {1: "image-weighted", 2: "class-balanced"}


def refuse_mixed_validation_metric(logged_version: int, what: str) -> None:
    """A resume across metric versions would log two meanings under one metric name; refuse it.

    Refusing (rather than tagging and going on) keeps every leaderboard one-meaning, and a run or
    sweep of the older meaning stays readable as it was logged.
    """
    if logged_version == VALIDATION_METRIC_VERSION:
        return
    logged = VALIDATION_METRIC_MEANINGS.get(logged_version, "unknown")
    ours = VALIDATION_METRIC_MEANINGS[VALIDATION_METRIC_VERSION]
    raise ConfigError(
        f"{what} logged validation metrics of version {logged_version} ({logged}); this imbcil logs "
        f"version {VALIDATION_METRIC_VERSION} ({ours}), and a resume would mix the two under one name: start it anew"
    )


def _write_matrix(path: Path, matrix: np.ndarray) -> None:
    """Plain numeric CSV, row = after task t, column = task u, NaN written as `nan`."""
    np.savetxt(path, matrix, delimiter=",", fmt="%.4f")


# ---------------------------------------------------------------------------------------------
# Riding out an outage of the store

RETRY_ENV = "IMBCIL_TRACKING_RETRY_S"
DEFAULT_RETRY_TIMEOUT_S = 300.0
# One request's wait for an answer; MLflow's own default (120 s, 7 retries with backoff) would
# let a single call outlast the whole retry budget.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
_FIRST_RETRY_DELAY_S = 0.5
_MAX_RETRY_DELAY_S = 20.0
# After the budget ran out once, the run's last calls (marking it FAILED) try once, briefly.
_LOST_STORE_TIMEOUT_S = 5.0
# Answers that mean "not now" rather than "never".
_TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})
# An answer that refused the request before doing anything: safe to repeat even if not idempotent.
_REFUSED_STATUS = frozenset({429, 503})
_STATUS_IN_MESSAGE = re.compile(r"error code (\d{3}) != 200")

_T = TypeVar("_T")


def default_retry_timeout() -> float:
    """How long a tracker keeps retrying through an outage: $IMBCIL_TRACKING_RETRY_S, else 300 s."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise TrackingError(f"{RETRY_ENV}: expected a number of seconds >= 0, got {raw!r}")
    return value


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: causes, contexts, and the exceptions that requests/urllib3 nest in args."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]


def _never_sent(exc: BaseException) -> bool:
    """No connection was made, so repeating the request cannot make the server do anything twice."""
    import urllib3.exceptions

    kinds = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError, ConnectionRefusedError, socket.gaierror)
    return any(isinstance(cause, kinds) for cause in _causes(exc))


def _answer_status(exc: BaseException) -> int | None:
    """The HTTP status (or its equivalent for a database store) that the failure carries, if any."""
    for cause in _causes(exc):
        if isinstance(cause, MlflowException):
            if cause.error_code in _TRANSIENT_CODES:
                return cause.get_http_status_code()
            found = _STATUS_IN_MESSAGE.search(cause.message or "")
            if found:
                return int(found.group(1))
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _transient(exc: BaseException, idempotent: bool) -> bool:
    """Whether waiting and repeating the operation can succeed without doing anything twice."""
    if isinstance(exc, (TrackingError, KeyboardInterrupt)):
        return False
    if _never_sent(exc):
        return True
    status = _answer_status(exc)
    if status in _REFUSED_STATUS:
        return True
    if not idempotent:
        return False
    if status in _TRANSIENT_STATUS:
        return True
    import requests

    # Sent, but no answer came back (the server died mid-request, or a read timed out).
    lost = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    return any(isinstance(cause, lost) for cause in _causes(exc))


# ---------------------------------------------------------------------------------------------
# The run


class RunTracker:
    """One MLflow run: config, class order, one batch of metrics and artifacts per phase.

    Used as a context manager it always ends the run: FINISHED, KILLED on Ctrl-C, FAILED (with
    the error as a tag) on any other exception. Given `run_id`, it resumes that run instead of
    creating one, so a restarted trial keeps one history.

    When the store stops answering, every write is retried with exponential backoff for up to
    `retry_timeout_s` (default $IMBCIL_TRACKING_RETRY_S, else 300 s) and lands exactly once when
    it is back; past that, the call raises TrackingError and the phases logged so far stay
    intact for a resume. Each request waits at most `request_timeout_s` for an answer.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str | None,
        run_name: str | None = None,
        *,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        retry_timeout_s: float | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ):
        self.tracking_uri = tracking_uri
        self.retry_timeout_s = default_retry_timeout() if retry_timeout_s is None else float(retry_timeout_s)
        if not math.isfinite(self.retry_timeout_s) or self.retry_timeout_s < 0:
            raise ValueError(f"retry_timeout_s must be >= 0 (got {retry_timeout_s!r})")
        self.request_timeout_s = float(request_timeout_s)
        self._store_lost = False
        self.client = MlflowClient(tracking_uri)
        self._acc_by_phase: dict[int, float] = {}
        self._finished = False
        extra = {k: _tag_value(v) for k, v in (tags or {}).items() if v is not None}
        if parent_run_id:
            extra[PARENT_RUN_TAG] = parent_run_id
        if run_id is None:
            if not experiment:
                raise TrackingError("a new run needs an experiment name")
            self._experiment_id = self._call("open the experiment", lambda: experiment_id(self.client, experiment))
            self._run_id = self._create_run(extra, run_name)
            self.resumed = False
        else:
            run = self._call("open the run", lambda: self._existing_run(run_id, experiment))
            self._run_id = run_id
            self._experiment_id = run.info.experiment_id
            self._call("open the run", lambda: self.client.update_run(run_id, status="RUNNING"))
            if extra:
                self._log_tags(extra)
            self._acc_by_phase = self._acc_history()
            self.resumed = True

    def _create_run(self, tags: Mapping[str, str], run_name: str | None) -> str:
        """A new run, created once even when the answer to the request was lost.

        A retry first looks for the run the lost request may have created, by a key tag.
        """
        key = os.urandom(16).hex()
        tags = {USER_TAG: _user(), **tags, RUN_KEY_TAG: key}
        sent = False

        def create():
            nonlocal sent
            if sent:
                found = self.client.search_runs(
                    [self._experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
                )
                if found:
                    return found[0]
            sent = True
            name = redact_text(run_name) if run_name else None
            return self.client.create_run(self._experiment_id, tags=_redacted(tags), run_name=name)

        return self._call("create the run", create).info.run_id

    # -- identity ------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def accuracy_per_phase(self) -> list[float]:
        """`acc` of phases 0..last logged (NaN where a phase had none), as drawn in acc_curve.png."""
        if not self._acc_by_phase:
            return []
        return [self._acc_by_phase.get(p, math.nan) for p in range(max(self._acc_by_phase) + 1)]

    @property
    def url(self) -> str:
        return run_url(self.tracking_uri, self._experiment_id, self._run_id)

    @property
    def retrying(self) -> "RetryingClient":
        """This tracker's MlflowClient with every call retried as the tracker's own writes are."""
        return RetryingClient(self)

    # -- errors and retries --------------------------------------------------------------------

    def _failure(self, action: str, exc: BaseException) -> TrackingError:
        """MLflow's exceptions carry response bodies and tracebacks; callers get one line."""
        if isinstance(exc, TrackingError):
            return exc
        return TrackingError(f"could not {action} in {redact_uri(self.tracking_uri)}: {_short_reason(exc)}")

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (MlflowException, OSError) as exc:  # requests' connection errors are OSErrors too
            raise self._failure(action, exc) from exc

    def _request_knobs(self, seconds_left: float) -> dict[str, str]:
        """MLflow's settings for one attempt: no retries of its own, a bounded wait, and no
        progress bar (its lines would break a verb's one-line error and its table)."""
        wait = min(self.request_timeout_s, seconds_left) if seconds_left > 0 else _LOST_STORE_TIMEOUT_S
        return {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(wait))),
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }

    def _call(self, action: str, operation: Callable[[], _T], *, idempotent: bool = True) -> _T:
        """Run one store operation, repeating it with exponential backoff while the store is away.

        An operation that may have reached the server is repeated only if it is `idempotent`;
        otherwise only when the request provably never left (no connection).
        """
        budget = 0.0 if self._store_lost else self.retry_timeout_s
        started = time.monotonic()
        delay = _FIRST_RETRY_DELAY_S
        failures = 0
        while True:
            try:
                with scoped_env(self._request_knobs(budget - (time.monotonic() - started))):
                    result = operation()
            except Exception as exc:
                if not isinstance(exc, (MlflowException, OSError)) and not _never_sent(exc):
                    raise
                if not _transient(exc, idempotent):
                    raise self._failure(action, exc) from exc
                waited = time.monotonic() - started
                if waited + delay > budget:
                    self._store_lost = True
                    raise TrackingError(
                        f"tracking store {redact_uri(self.tracking_uri)} did not answer for {waited:.0f} s "
                        f"(could not {action}): {_short_reason(exc)}"
                    ) from exc
                failures += 1
                if failures == 1:
                    logger.warning(
                        "tracking store %s does not answer (%s); retrying to %s for up to %g s",
                        redact_uri(self.tracking_uri), _short_reason(exc), action, budget,
                    )
                time.sleep(delay)
                delay = min(2 * delay, _MAX_RETRY_DELAY_S)
                continue
            if failures:
                logger.warning(
                    "tracking store %s answers again after %.0f s; %s done",
                    redact_uri(self.tracking_uri), time.monotonic() - started, action,
                )
            self._store_lost = False
            return result

    # -- reading back --------------------------------------------------------------------------

    def _existing_run(self, run_id: str, experiment: str | None):
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise TrackingError(f"run {run_id} not found in {redact_uri(self.tracking_uri)}") from None
            raise
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"run {run_id} is deleted; restore it (mlflow runs restore --run-id {run_id}) to resume")
        if experiment:
            actual = self.client.get_experiment(run.info.experiment_id).name
            if actual != experiment:
                raise TrackingError(f"run {run_id} belongs to experiment {actual!r}, not {experiment!r}")
        return run

    def _acc_history(self) -> dict[int, float]:
        """Accuracy per fully logged phase, from the run's metric history (for a resumed run)."""
        last = self.last_logged_phase()
        if last is None:
            return {}
        latest: dict[int, Metric] = {}
        history = self._call("read the run", lambda: self.client.get_metric_history(self._run_id, "acc"))
        for metric in history:
            # A phase logged twice (by an older version that logged metrics before artifacts,
            # cut off, then redone) keeps its newest value.
            if metric.step <= last and (metric.step not in latest or metric.timestamp >= latest[metric.step].timestamp):
                latest[metric.step] = metric
        return {step: metric.value for step, metric in sorted(latest.items())}

    def _log_tags(self, tags: Mapping[str, Any], action: str = "log tags") -> None:
        items = [RunTag(key, _tag_value(value)) for key, value in _redacted(tags).items()]
        for chunk in _chunks(items, _BATCH_LIMIT):
            self._call(action, lambda chunk=chunk: self.client.log_batch(self._run_id, tags=chunk, synchronous=True))

    # -- per run -------------------------------------------------------------------------------

    def log_config(
        self,
        cfg: RunConfig,
        extra_tags: Mapping[str, Any] | None = None,
        *,
        allow_changed: Collection[str] = (),
    ) -> None:
        """The full config as params (dotted keys) and `config.yaml`, plus searchable tags.

        Params cannot change once logged; a resumed run skips those it has and refuses a config
        that differs, since its history would then mix two configs. Keys in `allow_changed`
        (where a run executes, e.g. data.root or device) keep their first value instead.
        Values that hold credentials (a data root given as a URI) are logged redacted.
        """
        action = "log the config"
        params = {key: _param_value(redact_text(value)) for key, value in flatten(cfg).items()}
        existing = self._call(action, lambda: self.client.get_run(self._run_id).data.params)
        changed = [
            key for key, value in params.items() if key in existing and existing[key] != value and key not in allow_changed
        ]
        if changed:
            key = changed[0]
            raise TrackingError(
                f"run {self._run_id} was logged with {key}={existing[key]}, the config now says "
                f"{key}={params[key]}; params cannot change, start a new run"
            )
        todo = [Param(key, value) for key, value in params.items() if key not in existing]
        for chunk in _chunks(todo, _BATCH_LIMIT):
            # Re-sending a param with the same value is accepted, so a retried batch is harmless.
            self._call(action, lambda chunk=chunk: self.client.log_batch(self._run_id, params=chunk, synchronous=True))
        tags = {
            "learner": cfg.learner.name,
            "dataset": cfg.data.dataset,
            "scenario": cfg.data.scenario,
            "protocol": protocol_name(cfg),
            "seed": cfg.seed,
            VALIDATION_METRIC_TAG: VALIDATION_METRIC_VERSION,
            **environment_tags(),
        }
        tags.update({k: v for k, v in (extra_tags or {}).items() if v is not None})
        self._log_tags(tags, action)
        text = redact_text(dump_yaml(cfg))
        self._call(action, lambda: self.client.log_text(self._run_id, text, "config.yaml"))

    def log_class_order(self, class_order: Sequence[int], class_names: Sequence[str] = ()) -> None:
        """`class_order.csv`: position (the label the model uses), original label, class name.

        `class_names[original_label]` is the dataset's name of that class (may be empty).
        """
        if class_names and len(class_names) < max(class_order, default=-1) + 1:
            raise ValueError(f"class_names has {len(class_names)} names, class order uses label {max(class_order)}")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["position", "original_label", "name"])
        for position, original in enumerate(class_order):
            writer.writerow([position, int(original), class_names[original] if class_names else ""])
        text = buffer.getvalue()
        self._call("log the class order", lambda: self.client.log_text(self._run_id, text, "class_order.csv"))

    # -- per phase -----------------------------------------------------------------------------

    def log_phase(self, result: PhaseResult) -> None:
        """The phase's artifacts, then its metrics (step = phase) and the done-marker in one request.

        Metrics go last, with the marker, so a run cut off anywhere in here has either all of
        the phase or none of its metrics: the redone phase never duplicates a point. The Metric
        objects (timestamps included) are built once, so a retried request sends identical
        rows, which MLflow's SQL store ignores; artifacts re-upload to the same paths.
        """
        t = result.phase
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, t)
            for key, value in result.metrics.items()
            if value is not None and not math.isnan(float(value))
        ]
        acc = result.metrics.get("acc")
        # A re-logged phase makes later points stale.
        self._acc_by_phase = {p: v for p, v in self._acc_by_phase.items() if p < t}
        if acc is not None and not math.isnan(float(acc)):
            self._acc_by_phase[t] = float(acc)

        from pipeline import plots  # matplotlib: not needed before the first phase is logged

        action = f"log phase {t}"
        with tempfile.TemporaryDirectory(prefix="imbcil-phase-") as tmp:
            root = Path(tmp)
            folder = root / f"phase_{t}"
            folder.mkdir()
            seen = slice(0, t + 1)
            acc_matrix = np.asarray(result.acc_matrix, dtype=float)[seen, seen]
            _write_matrix(folder / "acc_matrix.csv", acc_matrix)
            _write_matrix(folder / "task_aware_matrix.csv", np.asarray(result.task_aware_matrix, dtype=float)[seen, seen])
            if result.val_matrix is not None:
                _write_matrix(folder / "val_matrix.csv", np.asarray(result.val_matrix, dtype=float)[seen, seen])
            plots.accuracy_heatmap(acc_matrix, folder / "acc_heatmap.png", title=f"accuracy after phase {t}")
            if len(result.per_class.get("head_weight_norm", ())) > 0:
                # In phase 0 every class is new, so the shot groups say more than old/new.
                new_labels = result.task_classes[t] if t > 0 else None
                plots.weight_norm_plot(
                    result.per_class, folder / "weight_norms.png", new_labels=new_labels, title=f"head weight norms, phase {t}"
                )
            pq.write_table(pa.table(dict(result.per_class)), folder / "per_class.parquet")
            torch.save(result.state, folder / "checkpoint.pt")
            curve = [self._acc_by_phase.get(p, math.nan) for p in range(t + 1)]
            plots.accuracy_curve(curve, root / "acc_curve.png", label="acc")
            self._call(action, lambda: self.client.log_artifacts(self._run_id, tmp))
        done = [RunTag(LAST_PHASE_TAG, str(t)), RunTag(phase_from_tag(t), result.reused_from or self._run_id)]
        for start in range(0, max(len(metrics), 1), _METRIC_BATCH_LIMIT):
            chunk = metrics[start : start + _METRIC_BATCH_LIMIT]
            # The marker rides with the last chunk: it is set only once every metric is stored.
            tags = done if start + _METRIC_BATCH_LIMIT >= len(metrics) else []
            self._call(action, lambda chunk=chunk, tags=tags: self.client.log_batch(self._run_id, metrics=chunk, tags=tags, synchronous=True))

    def last_logged_phase(self) -> int | None:
        """The last phase whose metrics and artifacts are all stored (None before phase 0 is)."""
        value = self._call("read the run", lambda: self.client.get_run(self._run_id).data.tags.get(LAST_PHASE_TAG))
        return int(value) if value is not None else None

    def validation_metric_version(self) -> int:
        """What this run's validation metrics mean; 1 for a run logged before the version was recorded."""
        value = self._call("read the run", lambda: self.client.get_run(self._run_id).data.tags.get(VALIDATION_METRIC_TAG))
        return int(value) if value is not None else 1

    def phase_logged(self, phase: int) -> bool:
        last = self.last_logged_phase()
        return last is not None and phase <= last

    def load_checkpoint(self, phase: int | None = None) -> dict[str, Any]:
        """The state saved with `phase` (default: the last fully logged phase), on the CPU."""
        if phase is None:
            phase = self.last_logged_phase()
            if phase is None:
                raise TrackingError(f"run {self._run_id} has no fully logged phase to resume from")
        with tempfile.TemporaryDirectory(prefix="imbcil-ckpt-") as tmp:
            local = self._call(
                f"download the checkpoint of phase {phase}",
                lambda: self.client.download_artifacts(self._run_id, f"phase_{phase}/checkpoint.pt", tmp),
            )
            return torch.load(local, map_location="cpu", weights_only=False)

    # -- ending --------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED); `error` becomes a one-line tag."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED (got {status!r})")
        if self._finished:
            return
        action = "end the run"
        if error is not None:
            message = error_tag_value(error)
            self._call(action, lambda: self.client.set_tag(self._run_id, ERROR_TAG, message))

        self.retrying.set_terminated(self._run_id, status)
        self._finished = True

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.finish("FINISHED")
            return False
        if isinstance(exc, KeyboardInterrupt):
            status, error = "KILLED", None
        else:
            status, error = "FAILED", str(exc) or type(exc).__name__
        try:
            self.finish(status, error=error)
        except Exception as close_exc:  # the original exception matters more
            logger.warning("could not mark run %s %s: %s", self._run_id, status, redact_text(close_exc))
        return False


class RetryingClient:
    """The MLflow calls a driver makes around runs, each riding out an outage within the tracker's bound.

    For the bookkeeping around runs -- a sweep driver closing its trials' runs, a parent run's
    summary -- which would otherwise wait on MLflow's own HTTP retries, unbounded by
    $IMBCIL_TRACKING_RETRY_S. Only calls that may be repeated: reads, tags, status, files, and
    metrics whose timestamps are fixed before the call. Tag values are redacted, as the tracker's
    own are.
    """

    def __init__(self, tracker: RunTracker) -> None:
        self._tracker = tracker

    def _retry(self, action: str, call: Callable[[MlflowClient], _T]) -> _T:
        client = self._tracker.client
        return self._tracker._call(action, lambda: call(client))

    def get_run(self, run_id: str):
        return self._retry("get run", lambda c: c.get_run(run_id))

    def search_runs(self, experiment_ids: list[str], filter_string: str = "", **options: Any):
        return self._retry("search runs", lambda c: c.search_runs(experiment_ids, filter_string=filter_string, **options))

    def get_metric_history(self, run_id: str, key: str):
        return self._retry("get metric history", lambda c: c.get_metric_history(run_id, key))

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self._retry("set tag", lambda c: c.set_tag(run_id, key, redact_text(value)))

    def delete_tag(self, run_id: str, key: str) -> None:
        self._retry("delete tag", lambda c: c.delete_tag(run_id, key))

    def set_terminated(self, run_id: str, status: str) -> None:
        def terminate(c: MlflowClient) -> None:
            # Against a server, set_terminated prints "View run ... at <tracking URI>" to stdout,
            # credentials included; the verbs print the run's redacted `url` instead.
            with scoped_env({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
                c.set_terminated(run_id, status=status)

        self._retry("end the run", terminate)

    def update_run(self, run_id: str, name: str) -> None:
        self._retry("rename the run", lambda c: c.update_run(run_id, name=name))

    def log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = (), tags: Sequence[RunTag] = ()) -> None:
        tags = [RunTag(t.key, redact_text(t.value)) for t in tags]
        self._retry("log batch", lambda c: c.log_batch(run_id, metrics=list(metrics), params=list(params), tags=tags, synchronous=True))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._retry("log text", lambda c: c.log_text(run_id, text, artifact_file))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._retry("log artifact", lambda c: c.log_artifact(run_id, local_path, artifact_path))

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        self._retry("log artifacts", lambda c: c.log_artifacts(run_id, local_dir, artifact_path))

    def download_artifacts(self, run_id: str, path: str, dst_path: str) -> str:
        return self._retry("download artifacts", lambda c: c.download_artifacts(run_id, path, dst_path))


def _redacted(tags: Mapping[str, Any]) -> dict[str, str]:
    return {key: redact_text(value) for key, value in tags.items()}
