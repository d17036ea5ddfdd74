"""One writer per store: a second build is refused naming the holder, a dead holder's lock is taken
over, and a superseded build's token stops its workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.store.lock import build_lock, check_token
from radio_distill.errors import CacheLayoutError

HOLD = """
import sys, time
from pathlib import Path
from radio_distill.store.lock import build_lock
with build_lock(Path(sys.argv[1])) as token:
    print(token, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder_process(tmp_path):
    """`start(store)` -> (process, token): another process holding the store's build lock."""
    started = []

    def start(store):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        token = proc.stdout.readline().strip()
        assert token, "the holder process did not take the lock"
        return proc, token

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_second_build_is_refused_naming_the_holder(holder_process, tiny_config, tmp_path):
    out = tmp_path / "busy.zarr"
    proc, token = holder_process(out)
    with pytest.raises(CacheLayoutError) as e:
        build_cache(tiny_config(out), progress=False)
    message = str(e.value)
    assert "\n" not in message and "being written by another build" in message
    assert f"host {socket.gethostname()}, pid {proc.pid}," in message and f"build {token[:8]}" in message
    assert sorted(p.name for p in out.iterdir()) == [L.HOLDER_FILE, L.LOCK_FILE]  # nothing else created
    check_token(out, token)  # the holder still owns the store


def test_a_thread_of_the_same_process_is_refused_too(tmp_path):
    out = tmp_path / "threads.zarr"
    holding, release, errors = threading.Event(), threading.Event(), []

    def hold():
        with build_lock(out):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30)
        with pytest.raises(CacheLayoutError, match=f"pid {os.getpid()},"):
            with build_lock(out):
                errors.append("second lock taken")
    finally:
        release.set()
        thread.join()
    assert not errors
    with build_lock(out) as token:  # free again once the holder is done
        check_token(out, token)


def test_stale_lock_is_taken_over_and_the_old_token_refused(holder_process, tmp_path, capfd):
    out = tmp_path / "stale.zarr"
    proc, old = holder_process(out)
    proc.send_signal(signal.SIGKILL)  # like a killed driver: no cleanup ran
    proc.wait()
    assert json.loads((out / L.HOLDER_FILE).read_text())["token"] == old
    with build_lock(out) as token:
        assert f"taking over the lock of a build that is gone (host {socket.gethostname()}, pid {proc.pid}," \
            in capfd.readouterr().err
        record = json.loads((out / L.HOLDER_FILE).read_text())
        assert record["pid"] == os.getpid() and record["token"] == token != old
        check_token(out, token)
        with pytest.raises(CacheLayoutError, match=rf"build {old[:8]} no longer holds the lock \(now held by host "
                                                   rf".*pid {os.getpid()}.*\); not writing into it"):
            check_token(out, old)  # a worker the killed build left behind stops here
    assert not (out / L.HOLDER_FILE).exists()  # a clean exit leaves no holder: the next build takes over nothing
    with pytest.raises(CacheLayoutError, match="no build holds it"):
        check_token(out, token)
    with build_lock(out):
        assert "taking over" not in capfd.readouterr().err


def test_a_folder_that_is_not_a_store_gets_no_lock(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CacheLayoutError,
                       match=r"is not a radio-distill store and not empty \(it holds 'notes.txt'\); give another --out"):
        with build_lock(out):
            pass
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
