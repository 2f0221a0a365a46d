"""The shared floor under the verbs: scoped environment, a local Ray, store paths, error lines.

Each helper here had copies in several verbs that had begun to disagree (which Ray settings a
local instance gets, how long an error line may be, what a plain store path means); every verb
now uses these.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Optional

if TYPE_CHECKING:
    import torch

    from method.config import DataConfig
    from method.data import RawData

# The environment is process-wide: one lock keeps two threads' changes from undoing each other.
_ENV_LOCK = threading.RLock()

# Ray resolves 127.0.0.1 to the machine's first network interface unless it believes it runs a
# single-machine cluster (this variable, read into ray_constants at import); a local instance is
# told so while it starts, and its processes inherit the setting.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_MEMORY_MONITOR_ENV = "RAY_memory_monitor_refresh_ms"
ERROR_LINE_LIMIT = 500


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str], *, user_wins: bool = False) -> Iterator[None]:
    """Set environment variables for the block and put the old values back afterwards.

    `user_wins`: a variable the user has set keeps its value (for defaults of ours that a user
    may override). Changes are serialised per process.
    """
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in values}
        for key, value in values.items():
            if not (user_wins and key in os.environ):
                os.environ[key] = value
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def local_ray_settings() -> Iterator[None]:
    """Settings for a Ray instance this command starts, while it starts (its processes inherit them).

    Loopback: a local instance keeps every port on 127.0.0.1 (the flag is read into
    ray_constants at import, so the module's copy is switched too). Memory monitor off: on a shared
    machine Ray blames other programs' memory on its workers and kills them, and Tune (2.60)
    does not survive that kill -- it ends the whole fit -- while a worker the kernel's OOM killer
    takes is an ordinary failure that Tune retries. A user's own monitor setting wins.
    """
    import ray._private.ray_constants as ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    with scoped_env({RAY_LOOPBACK_ENV: "0"}), scoped_env({RAY_MEMORY_MONITOR_ENV: "0"}, user_wins=True):
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


# Starting Ray on this machine, for a dry run's estimate (measured about 6-8 s on 2 cores).
RAY_START_S = 8.0


def start_local_ray(num_cpus: int, **options) -> None:
    """A new Ray instance on this machine, on loopback, never one found running here.

    Its GCS takes a free port, so a Redis on 6379 is no obstacle.
    """
    import ray

    with local_ray_settings():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, **options)


def ray_task_device(device: str) -> "torch.device":
    """Where a Ray task (a trial, a reproduction seed) trains: on a GPU only if Ray gave it one.

    Since Ray 2.60 a task given no GPU still sees every card (ray-project/ray#54868), and
    `device: auto` would take cuda:0 without Ray counting it. Configs that insist on cuda are
    refused before such a task starts (sweep spec, reproduce).
    """
    import ray

    from method.trainer import resolve_device

    return resolve_device(device if ray.get_gpu_ids() else "cpu")


def unwritable_ancestor(path: Path) -> Optional[Path]:
    """The nearest existing folder above (or at) `path` when it is not a writable folder, else None.

    Where `path` does not exist yet, that folder is where it would be created.
    """
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return None if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else existing


def absolute_store_uri(uri: str) -> str:
    """A relative SQLite or file store made absolute: trials and seeds run in other directories.

    `sqlite:///mlflow.db` and a plain `mlruns` are relative to where the command was started;
    URIs of servers and absolute paths are kept as they are.
    """
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, _, query = uri[len("sqlite:///") :].partition("?")
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).absolute()}" + (f"?{query}" if query else "")
    if "://" not in uri and not uri.startswith("file:"):
        return str(Path(uri).expanduser().absolute())
    return uri


def error_line(text: object, limit: int = ERROR_LINE_LIMIT) -> str:
    """The most telling line of an error or traceback, on one line, at most `limit` characters.

    The last `SomeError: message` line of a traceback, else its last line; whitespace runs are
    folded, so a multi-line library message stays one line.
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    chosen = ""
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            chosen = line
            break
    else:
        chosen = lines[-1] if lines else ""
    return shorten(chosen, limit)


def exception_line(exc: BaseException, limit: int = ERROR_LINE_LIMIT) -> str:
    """`TypeName: message` of an exception, on one line."""
    text = " ".join(str(exc).split())
    return shorten(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, limit)


def shorten(text: str, limit: int) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# The decoded dataset of the last run this process trained: a sweep's worker runs one trial after
# another and a reproduction one seed after another on the same data, and skip the seconds of
# reading and decoding. One entry bounds the memory.
_DECODED: dict[tuple, "RawData"] = {}
# Where decoded datasets are kept between processes (default ~/.cache/imbcil); "off" keeps none.
CACHE_ENV = "IMBCIL_CACHE"
_CACHE_FORMAT = 1
_ARRAYS = ("train_images", "test_images", "train_labels", "test_labels")


def decoded_data(data: "DataConfig") -> "RawData":
    """The dataset `data` names, decoded once per process, and once per machine where it can be.

    Images decoded from a Parquet file or CIFAR's pickles are kept as .npy files in the cache
    folder, checked against the source files (path, size, modification time): a run after the
    first reads them in a fraction of a second instead of decoding for several.
    """
    from method.data import load_raw, resolve_source, source_files  # torch: only for the verbs that train

    key = (data.dataset, resolve_source(data), data.root, data.download)
    if key not in _DECODED:
        _DECODED.clear()
        files = source_files(data)
        folder = _cache_entry(data.dataset, key[1], files) if files else None
        raw = _read_cached(folder) if folder is not None else None
        if raw is None:
            raw = load_raw(data)
            if folder is not None and raw.train_images is not None:
                _write_cached(folder, raw)
        _DECODED[key] = raw
    return _DECODED[key]


def forget_decoded_data() -> None:
    """Drop the cached dataset (before handing the work to processes that decode their own)."""
    _DECODED.clear()


def cache_root() -> Optional[Path]:
    configured = os.environ.get(CACHE_ENV, "")
    if configured.lower() == "off":
        return None
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "imbcil"


def _cache_entry(dataset: str, source: str, files: list[Path]) -> Optional[Path]:
    """The cache folder of exactly these source files as they are now; None without a cache or files."""
    root = cache_root()
    if root is None or not all(path.is_file() for path in files):
        return None
    stamp = [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    digest = hashlib.sha256(json.dumps([_CACHE_FORMAT, dataset, source, stamp]).encode()).hexdigest()[:20]
    return root / f"{dataset}-{source}-{digest}"


def _read_cached(folder: Path) -> Optional["RawData"]:
    """The decoded arrays, or None when the entry is missing or unreadable (then it is rebuilt)."""
    import numpy as np
    import torch

    from method.data import RawData

    try:
        meta = json.loads((folder / "meta.json").read_text())
        # Mapped copy-on-write: a run reads only the pages of the images its subset keeps.
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c") for name in _ARRAYS}
    except (OSError, ValueError):
        return None
    return RawData(
        train_labels=arrays["train_labels"], test_labels=arrays["test_labels"], class_names=list(meta["class_names"]),
        train_images=torch.from_numpy(arrays["train_images"]), test_images=torch.from_numpy(arrays["test_images"]),
    )  # fmt: skip


def _write_cached(folder: Path, raw: "RawData") -> None:
    import numpy as np

    arrays = {
        "train_images": raw.train_images.numpy(), "test_images": raw.test_images.numpy(),
        "train_labels": np.asarray(raw.train_labels), "test_labels": np.asarray(raw.test_labels),
    }  # fmt: skip

    def write(staging: Path) -> None:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array)
        (staging / "meta.json").write_text(json.dumps({"format": _CACHE_FORMAT, "class_names": list(raw.class_names)}))

    publish_folder(folder, write)


def publish_folder(folder: Path, write: Callable[[Path], None]) -> bool:
    """Fill a folder beside its final name and rename it there; False when it did not land.

    A reader never sees half of one, and of two processes publishing the same folder at once the
    first rename wins and the other's copy goes. A cache that cannot be written is no error.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError:
        return False
    try:
        write(staging)
        os.rename(staging, folder)
        return True
    except OSError:
        return False  # another process renamed its complete copy first, or the disk is full
    finally:
        shutil.rmtree(staging, ignore_errors=True)
