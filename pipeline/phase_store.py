"""The phase store: a folder of trained phases by phase key, shared by every run that sees it.

Layout, one entry per key (method/phases.py names the keys):

    <store>/<key>/phase.pt        the StoredPhase (torch.save)
    <store>/<key>/meta.json       phase, checksum and size of phase.pt, who trained it, code version
    <store>/<key>/used_by/<run>   one empty file per run that took or trained it
    <store>/<key>.claim           while a run trains the phase: who, where, since when

An entry is written beside its final name and renamed into place, so a reader sees all of it or
none. A run that needs a phase another run has claimed waits for it, and past `wait_s` (or once
the claimant's process is gone) trains it itself. A corrupt entry is reported in one line, put
aside and retrained. The default folder is the sweep's storage folder for a sweep and the user's
cache for `run` and `reproduce`; IMBCIL_PHASE_STORE or --phase-store names another, `off` none.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from method.phases import StoredPhase, code_version
from pipeline.runtime import cache_root, publish_folder

PHASE_STORE_ENV = "IMBCIL_PHASE_STORE"
PHASE_STORE_DIR = "phases"  # its name inside a sweep's storage folder and the user's cache
OFF = "off"
ENTRY_FORMAT = 1
PHASE_FILE = "phase.pt"
META_FILE = "meta.json"
USED_BY = "used_by"
CLAIM_SUFFIX = ".claim"
DEFAULT_WAIT_S = 3600.0
_POLL_S = 1.0


def resolve_store_folder(option: Optional[str], default: Optional[Path]) -> Optional[Path]:
    """The store a verb uses: --phase-store, else IMBCIL_PHASE_STORE, else the verb's default; None: off."""
    for value in (option, os.environ.get(PHASE_STORE_ENV)):
        if value is not None and value.strip():
            return None if value.strip().lower() == OFF else Path(value.strip()).expanduser().absolute()
    return default


def user_store_folder() -> Optional[Path]:
    """`run` and `reproduce`'s default: beside the decoded-data cache (none when that is off)."""
    root = cache_root()
    return None if root is None else root / PHASE_STORE_DIR


def describe(folder: Optional[Path]) -> str:
    return "phase store: off, every phase is trained" if folder is None else f"phase store: {folder}"


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


@dataclass
class _Slot:
    entry: Optional[StoredPhase]
    wants_entry: bool
    save: Callable[[StoredPhase], None] = field(repr=False)


class FolderPhaseStore:
    """A phase store in a folder; `owner` (a run id) is recorded on every entry it trains or takes."""

    def __init__(self, folder: Path, owner: str = "", *, wait_s: float = DEFAULT_WAIT_S, warn: Callable[[str], None] = _warn) -> None:
        self.folder = Path(folder)
        self.owner = owner
        self.wait_s = wait_s
        self.warn = warn

    def for_owner(self, owner: str) -> "FolderPhaseStore":
        return FolderPhaseStore(self.folder, owner, wait_s=self.wait_s, warn=self.warn)

    # ------------------------------------------------------------------ the trainer's side

    @contextlib.contextmanager
    def slot(self, key: str, phase: int) -> Iterator[_Slot]:
        """The stored phase for `key`, or the claim to train it (released when the block ends)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            entry = self.read(key, phase)
            if entry is not None:
                self._mark_used(key)
                yield _Slot(entry, False, _refuse)
                return
            if self._claim(key):
                try:
                    yield _Slot(None, True, lambda stored: self.write(key, stored))
                finally:
                    self._claim_path(key).unlink(missing_ok=True)
                return
            claim = self._claim_info(key)
            if time.monotonic() > deadline or _claimant_gone(claim):
                who = claim.get("owner") or "another run"
                self.warn(f"phase store: phase {phase} ({key[:12]}) is claimed by {who}, which has not stored it; training it here")
                yield _Slot(None, True, lambda stored: self.write(key, stored))
                return
            time.sleep(_POLL_S)

    def read(self, key: str, phase: int) -> Optional[StoredPhase]:
        """The entry, checked against its checksum and code version; None when absent or unusable."""
        folder = self.folder / key
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / META_FILE).read_text())
            blob = (folder / PHASE_FILE).read_bytes()
            if meta.get("format") != ENTRY_FORMAT or len(blob) != meta["bytes"] or _sha256(blob) != meta["sha256"]:
                raise ValueError("its checksum does not match")
            if meta.get("code_version") != code_version():
                # Other method code (its key differs anyway): never reused, and made way for.
                raise ValueError(f"it was written by method code {meta.get('code_version')}")
            stored = StoredPhase(**torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False))
        except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, json.JSONDecodeError) as exc:
            self._put_aside(folder, phase, str(exc) or type(exc).__name__)
            return None
        stored.trained_by = meta.get("trained_by", "")
        return stored

    def write(self, key: str, stored: StoredPhase) -> None:
        """Publish the phase; another run's copy that landed first is kept instead."""
        stored.trained_by = self.owner
        buffer = io.BytesIO()
        torch.save({f.name: getattr(stored, f.name) for f in fields(stored)}, buffer)  # not asdict: it unpacks the rows
        blob = buffer.getvalue()
        meta = {
            "format": ENTRY_FORMAT, "key": key, "phase": stored.phase, "bytes": len(blob), "sha256": _sha256(blob),
            "trained_by": self.owner, "created": time.time(), "code_version": code_version(),
        }  # fmt: skip

        def fill(staging: Path) -> None:
            (staging / PHASE_FILE).write_bytes(blob)
            (staging / META_FILE).write_text(json.dumps(meta, indent=1))

        publish_folder(self.folder / key, fill)
        self._mark_used(key)

    # ------------------------------------------------------------------ housekeeping

    def entries(self) -> list["EntryInfo"]:
        if not self.folder.is_dir():
            return []
        infos = []
        for folder in sorted(self.folder.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                meta = json.loads((folder / META_FILE).read_text())
            except (OSError, ValueError):
                meta = {}
            uses = list((folder / USED_BY).iterdir()) if (folder / USED_BY).is_dir() else []
            users = sorted(p.name for p in uses)
            last_used = max((p.stat().st_mtime for p in uses), default=meta.get("created", 0.0))
            infos.append(EntryInfo(
                key=folder.name, phase=meta.get("phase"), bytes=_folder_bytes(folder), trained_by=meta.get("trained_by", ""),
                created=meta.get("created", 0.0), last_used=last_used, used_by=users,
                current=meta.get("code_version") == code_version(),
            ))  # fmt: skip
        return infos

    def prune(self, *, older_than_s: Optional[float] = None, stale_code: bool = False, everything: bool = False) -> list["EntryInfo"]:
        """Remove entries (all, unused for `older_than_s`, or of other code) and leftovers; returns the entries removed."""
        now = time.time()
        removed = []
        for info in self.entries():
            old = older_than_s is not None and now - info.last_used > older_than_s
            if everything or old or (stale_code and not info.current):
                shutil.rmtree(self.folder / info.key, ignore_errors=True)
                removed.append(info)
        for leftover in self.folder.glob(".*") if self.folder.is_dir() else []:
            # Staging copies of writers that died, and entries put aside as corrupt.
            if now - leftover.stat().st_mtime > 3600 or everything:
                shutil.rmtree(leftover, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------ claims and uses

    def _claim_path(self, key: str) -> Path:
        return self.folder / f"{key}{CLAIM_SUFFIX}"

    def _claim(self, key: str) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        try:
            fd = os.open(self._claim_path(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as claim:
            json.dump(info, claim)
        if (self.folder / key).is_dir():  # stored between our look and our claim
            self._claim_path(key).unlink(missing_ok=True)
            return False
        return True

    def _claim_info(self, key: str) -> dict:
        try:
            return json.loads(self._claim_path(key).read_text())
        except (OSError, ValueError):
            return {}  # released meanwhile, or being written

    def _mark_used(self, key: str) -> None:
        if not self.owner:
            return
        try:
            (self.folder / key / USED_BY).mkdir(exist_ok=True)
            (self.folder / key / USED_BY / _file_name(self.owner)).touch()
        except OSError:
            pass  # a read-only store still serves its phases

    def _put_aside(self, folder: Path, phase: int, why: str) -> None:
        self.warn(f"phase store: the entry of phase {phase} ({folder.name[:12]}) is unusable ({why}); retraining it")
        try:
            os.rename(folder, folder.parent / f".corrupt-{folder.name}-{int(time.time())}")
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class EntryInfo:
    key: str
    phase: Optional[int]
    bytes: int
    trained_by: str
    created: float
    last_used: float
    used_by: list[str]
    current: bool  # written by this method code, so usable


def _refuse(stored: StoredPhase) -> None:
    raise AssertionError("a phase taken from the store is not stored again")


def _claimant_gone(claim: dict) -> bool:
    """A claim of a process on this machine that no longer runs (it died while training)."""
    if not claim or claim.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _file_name(owner: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in owner)[:200]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
