"""One writer per store: `radio-cache build` holds `<store>/build.lock` for its whole run.

The lock is an OS file lock (filelock: `flock` on Unix), so it dies with its holder, even under
SIGKILL. Beside it, `<store>/build.json` names the holder (host, pid, start time) and a random
token. The file outlives a killed holder: a build that finds it while taking a free lock says it
takes over a build that is gone. Ray workers may outlive a killed driver and keep writing; they
call `check_token` before every shard write and done flag, so once a rerun holds the lock they stop.

S3 has no file locks, so there `build.json` itself is a lease: created only if absent (a conditional
put, If-None-Match), renewed by the holder every HEARTBEAT seconds, and abandoned once it has not been
renewed for STALE_AFTER periods (a killed build), or at once when its holder ran on this host (same
host name) under a pid that no longer exists: a rerun after a kill need not wait. A second build is refused while the lease is fresh
and takes it over, with a warning, once it is stale; the takeover is a conditional put on the stale
record's ETag (If-Match), so of two builds taking over at once only one wins. What this guarantees
rests on the clocks of the hosts agreeing to well within STALE_AFTER x HEARTBEAT, and on a live holder
renewing in time: a driver stalled longer than that (suspended, partitioned) loses the lease, its
renewal then fails and its workers stop at their next `check_token`, but a shard they were writing
in that instant may be written twice. Both writers write the same bytes (same inputs, same seeds),
and the new holder redoes any shard not marked done, so the store ends up as one build makes it.
"""

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import CacheLayoutError
from . import layout as L
from .location import Location, check_folder, location

HEARTBEAT = 30.0  # seconds between renewals of a build's lease on S3
STALE_AFTER = 3  # renewals missed before a lease is taken as abandoned (its build killed)


@contextmanager
def build_lock(store: str | Path | Location) -> Iterator[str]:
    """Hold the store's one-writer lock (creating the folder; on S3 a lease); yields this build's token.

    Raises:
        CacheLayoutError: another build holds the lock (naming its host and pid), or S3 refused (one line).
    """
    loc = location(store)
    loc.check()
    _check_ours(loc)
    if loc.remote:
        with _lease(loc) as token:
            yield token
        return
    store = loc.path
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
        record = _record(token)
        tmp = store / f"{L.HOLDER_FILE}.{token}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, store / L.HOLDER_FILE)  # workers reading it see the old record or the new, never half
        yield token
    finally:
        if (h := holder(store)) is not None and h["token"] == token:
            (store / L.HOLDER_FILE).unlink()
        lock.release()


def _record(token: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": token}


@contextmanager
def _lease(loc: Location) -> Iterator[str]:
    """Hold the S3 lease of the store at `loc` (see the module docstring); yields this build's token."""
    token = secrets.token_hex(16)
    record = {**_record(token), "lease_s": HEARTBEAT * STALE_AFTER}

    def put(**condition) -> str:
        return loc.write_text(L.HOLDER_FILE, json.dumps({**record, "renewed": time.time()}), **condition)

    try:
        etag = put(IfNoneMatch="*")
    except FileExistsError:
        etag = _take_over(loc, put)
    stop = threading.Event()

    def renew():
        nonlocal etag
        while not stop.wait(HEARTBEAT):
            try:
                etag = put(IfMatch=etag)
            except FileNotFoundError:  # deleted: nobody holds it, and workers stop writing
                return
            except OSError as e:
                if "pre-conditions" in str(e):  # another build took it over: our workers stop at their next check
                    return
                # else a passing network error: try again at the next period

    thread = threading.Thread(target=renew, name="build-lease", daemon=True)
    thread.start()
    try:
        yield token
    finally:
        stop.set()
        thread.join()
        if (h := holder(loc)) is not None and h["token"] == token:
            loc.delete(L.HOLDER_FILE)


def _take_over(loc: Location, put) -> str:
    """Take over the lease of a build that stopped renewing it; returns the new ETag.

    Raises:
        CacheLayoutError: the lease is fresh (its build runs), or another build took it over first.
    """
    etag = loc.etag(L.HOLDER_FILE)  # before the record: a renewal in between makes the If-Match below fail
    now = holder(loc)
    if now is not None:
        age = time.time() - now["renewed"]
        if age < now["lease_s"] and not _gone_from_here(now):
            raise CacheLayoutError(f"store '{loc}' is being written by another build ({_describe(now)}; lease renewed "
                                   f"{age:.0f} s ago); wait for it to finish or stop it: one build writes a store at a "
                                   f"time (a killed build's lease lapses after {now['lease_s']:.0f} s)")
        print(f"warning: taking over the lock of a build that is gone ({_describe(now)}; lease not renewed for "
              f"{age:.0f} s)", file=sys.stderr)
    try:
        return put(IfMatch=etag)
    except OSError:
        raise CacheLayoutError(f"store '{loc}': another build took over the abandoned lease at the same time "
                               f"({_describe(holder(loc))}); one build writes a store at a time") from None


def _gone_from_here(record: dict) -> bool:
    """Whether the lease holder ran on this host and its process is gone."""
    if record["host"] != socket.gethostname():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def holder(store: str | Path | Location) -> dict | None:
    """The record of the build holding (or last killed while holding) the lock, or None."""
    try:
        return json.loads(location(store).read_text(L.HOLDER_FILE))
    except FileNotFoundError:
        return None


def check_token(store: str | Path | Location, token: str) -> None:
    """Raise unless the build with `token` still holds the store's lock: call before writing a shard.

    Raises:
        CacheLayoutError: the build was superseded (its driver died and a rerun took over) or has ended.
    """
    now = holder(store)
    if now is None or now["token"] != token:
        held = f"now held by {_describe(now)}" if now else "no build holds it"
        raise CacheLayoutError(f"store '{store}': build {token[:8]} no longer holds the lock ({held}); "
                               "not writing into it")


def _check_ours(store: Location) -> None:
    """Refuse a folder (or S3 prefix) that is neither empty, nor a store, nor one a build was creating (our
    own files only): a build never writes (or, with --overwrite, deletes) anything in a folder not its own."""
    if not store.remote:
        check_folder(store.path, "--out")
    names = store.names()
    foreign = sorted(n for n in names if not L.ours(n))
    if not names or (names & {L.LOCK_FILE, L.HOLDER_FILE, L.STAGING} and not foreign):  # STAGING: a failed S3 creation
        return
    try:
        fmt = json.loads(store.read_text("zarr.json"))["attributes"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        fmt = None
    if fmt != L.FORMAT:
        raise CacheLayoutError(f"'{store}' is not a radio-distill store and not empty (it holds "
                               f"'{(foreign or sorted(names))[0]}'); give another --out")


def _describe(record: dict | None) -> str:
    if record is None:
        return "holder not recorded yet"
    return f"host {record['host']}, pid {record['pid']}, started {record['started']}, build {record['token'][:8]}"
