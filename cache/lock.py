"""One writer per store: `radio-cache build` holds `<store>/build.lock` for its whole run.

The lock is an OS file lock (filelock: `flock` on Unix), so it dies with its holder, even under
SIGKILL. Beside it, `<store>/build.json` names the holder (host, pid, start time) and a random
token. The file outlives a killed holder: a build that finds it while taking a free lock says it
takes over a build that is gone. Ray workers may outlive a killed driver and keep writing; they
call `check_token` before every shard write and done flag, so once a rerun holds the lock they stop.
"""

import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import CacheLayoutError
from . import layout as L


@contextmanager
def build_lock(store: Path) -> Iterator[str]:
    """Hold the store's one-writer lock (creating the folder); yields this build's token.

    Raises:
        CacheLayoutError: another build holds the lock (naming its host and pid).
    """
    _check_ours(store)
    store.mkdir(parents=True, exist_ok=True)
    lock = FileLock(store / L.LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CacheLayoutError(f"store '{store}' is being written by another build ({_describe(holder(store))}); "
                               "wait for it to finish or stop it: one build writes a store at a time") from None
    token = secrets.token_hex(16)
    try:
        gone = holder(store)
        if gone is not None:  # its lock died with it, its record did not
            print(f"warning: taking over the lock of a build that is gone ({_describe(gone)})", file=sys.stderr)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "token": token}
        tmp = store / f"{L.HOLDER_FILE}.{token}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, store / L.HOLDER_FILE)  # workers reading it see the old record or the new, never half
        yield token
    finally:
        if (h := holder(store)) is not None and h["token"] == token:
            (store / L.HOLDER_FILE).unlink()
        lock.release()


def holder(store: Path) -> dict | None:
    """The record of the build holding (or last killed while holding) the lock, or None."""
    try:
        return json.loads((Path(store) / L.HOLDER_FILE).read_text())
    except FileNotFoundError:
        return None


def check_token(store: str | Path, token: str) -> None:
    """Raise unless the build with `token` still holds the store's lock: call before writing a shard.

    Raises:
        CacheLayoutError: the build was superseded (its driver died and a rerun took over) or has ended.
    """
    now = holder(Path(store))
    if now is None or now["token"] != token:
        held = f"now held by {_describe(now)}" if now else "no build holds it"
        raise CacheLayoutError(f"store '{store}': build {token[:8]} no longer holds the lock ({held}); "
                               "not writing into it")


def _check_ours(store: Path) -> None:
    """Refuse a folder that is neither empty, nor a store, nor one a build was creating: a build never
    writes (or, with --overwrite, deletes) anything in a folder that is not its own."""
    if not store.exists():
        return
    if not store.is_dir():
        raise CacheLayoutError(f"'{store}' is a file, not a radio-distill store; give another --out")
    names = {p.name for p in store.iterdir()}
    if not names or L.LOCK_FILE in names:
        return
    try:
        fmt = json.loads((store / "zarr.json").read_text())["attributes"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        fmt = None
    if fmt != L.FORMAT:
        raise CacheLayoutError(f"'{store}' is not a radio-distill store and not empty; give another --out")


def _describe(record: dict | None) -> str:
    if record is None:
        return "holder not recorded yet"
    return f"host {record['host']}, pid {record['pid']}, started {record['started']}, build {record['token'][:8]}"
