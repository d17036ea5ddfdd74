"""Stores on S3-compatible object storage (a local moto server): build, kill and resume, verify, the lease,
and one line for a missing bucket, refused credentials or an unreachable endpoint."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from radio_distill.store import layout as L
from radio_distill.store import lock
from radio_distill.cache.build import build_cache
from radio_distill.store.inspect import store_info, verify_store
from radio_distill.store.location import location
from radio_distill.store.lock import build_lock, check_token
from radio_distill.store.group import open_array, open_store
from radio_distill.cli import cache_app
from radio_distill.errors import CacheLayoutError

AWS_NOISE = ("AuthCredentialsProvider", ".aws/", "aws-error")  # what tensorstore's AWS layer logs when let


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _done(url: str) -> int:
    loc = location(url)
    if not loc.exists("zarr.json"):
        return 0
    return int(open_array(loc, L.done_array("clip")).read().result().sum())


@pytest.mark.slow
def test_a_build_killed_on_s3_resumes_to_the_store_one_build_makes(ray_session, sample_dataset, tiny_config, tiny_store,
                                                                    read_arrays, s3_url, capfd):
    # the build in its own process, with its own Ray
    code = "import sys; from radio_distill.cli import cache_app; sys.argv[0] = 'radio-cache'; cache_app()"
    build = subprocess.Popen([sys.executable, "-c", code, "build", str(sample_dataset), "--out", s3_url, "--teachers",
                              "tiny", "--views", "2", "--shard-size", "4", "--workers", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 180
    while _done(s3_url) == 0:
        assert build.poll() is None, build.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard done within 180 s"
        time.sleep(0.2)
    os.killpg(build.pid, signal.SIGKILL)  # the driver and the Ray it started
    build.wait()
    assert not any(noise in build.stderr.read().decode() for noise in AWS_NOISE)
    assert 0 < _done(s3_url) < 15, "the build finished before the kill"
    line = _one_line(CliRunner().invoke(cache_app, ["verify", s3_url]))
    assert "is not done" in line

    report = build_cache(tiny_config(s3_url), progress=False)  # at once: the lease holder's pid is gone from here
    assert report["complete"] and report["failed"] == {}
    assert "taking over the lock of a build that is gone" in capfd.readouterr().err

    resumed, one_go = read_arrays(location(s3_url).zarr_store(read_only=True)), read_arrays(tiny_store)
    assert resumed.keys() == one_go.keys()
    for name, values in one_go.items():
        assert np.array_equal(resumed[name], values), name
    assert verify_store(s3_url)["ok"]
    info = store_info(s3_url)
    assert info["store"] == s3_url and info["shards_done"] == info["shards_total"] == 15 and info["bytes"] > 0
    for command in ("info", "verify"):
        result = CliRunner().invoke(cache_app, [command, s3_url])
        assert result.exit_code == 0 and s3_url in result.stdout, result.output
    assert not any(noise in capfd.readouterr().err for noise in AWS_NOISE)
    assert not location(s3_url).exists(L.HOLDER_FILE)  # the lease ends with its build


def _record(token: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": "s", "token": token * 8, "renewed": time.time(),
            "lease_s": 90}


def test_a_store_being_created_on_s3_is_named_by_every_command(s3_url, tiny_config):
    loc = location(s3_url)
    loc.write_text(L.HOLDER_FILE, json.dumps({**_record("t"), "host": "another-host"}))
    loc.write_text(f"{L.STAGING}/zarr.json", "{}")  # a creation killed halfway
    loc.write_text(f"{L.IDS}/zarr.json", "{}")  # while it was copying the store in
    for lease in (True, False):  # its build killed, or failed (and ended its lease)
        for call in (open_store, store_info, verify_store):
            with pytest.raises(CacheLayoutError, match="is not created yet"):
                call(s3_url)
        for command in ("info", "verify"):
            assert "is not created yet" in _one_line(CliRunner().invoke(cache_app, [command, s3_url]))
        if lease:
            with pytest.raises(CacheLayoutError, match=r"being written by another build \(host another-host"):
                build_cache(tiny_config(s3_url), progress=False)
            loc.delete(L.HOLDER_FILE)
    with build_lock(s3_url):  # a rerun may take the prefix (the staging says a build was creating it)
        pass


def test_the_lease_refuses_a_second_build_renews_and_is_taken_over_once_stale(s3_url, monkeypatch, capfd):
    monkeypatch.setattr(lock, "HEARTBEAT", 0.2)
    loc = location(s3_url)
    with build_lock(s3_url) as token:
        first = lock.holder(s3_url)
        with pytest.raises(CacheLayoutError, match=rf"being written by another build \(host {socket.gethostname()}, "
                                                   rf"pid {os.getpid()}, .*build {token[:8]}; lease renewed 0 s ago\)"):
            with build_lock(s3_url):
                pass
        time.sleep(0.7)
        check_token(s3_url, token)
        assert lock.holder(s3_url)["renewed"] > first["renewed"]  # the driver renews it
    assert not loc.exists(L.HOLDER_FILE)

    with build_lock(s3_url) as old:  # a build whose renewals stopped (killed) 10 s ago
        loc.write_text(L.HOLDER_FILE, json.dumps({**lock.holder(s3_url), "renewed": time.time() - 10, "lease_s": 0.6}))
        with build_lock(s3_url) as new:
            assert "warning: taking over the lock of a build that is gone" in capfd.readouterr().err
            with pytest.raises(CacheLayoutError, match=f"build {old[:8]} no longer holds the lock"):
                check_token(s3_url, old)
            check_token(s3_url, new)
            time.sleep(0.5)  # the old holder's next renewal fails on the ETag and stops: the new lease stands
            check_token(s3_url, new)

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    loc.write_text(L.HOLDER_FILE, json.dumps({**_record("killed"), "pid": int(gone.stdout), "renewed": time.time()}))
    with build_lock(s3_url):  # a fresh lease, but its holder ran here and its process is gone: no wait
        assert "taking over the lock of a build that is gone (host" in capfd.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, pattern", [
    ("secret", r"access denied \(.*\); check AWS_ACCESS_KEY_ID"),
    ("no keys", r"no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("bucket", r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+; create it"),
    ("endpoint", r"cannot reach http://127\.0\.0\.1:\d+ \(.*\); check AWS_ENDPOINT_URL"),
    ("url", r"expected s3://BUCKET/PREFIX"),
])
def test_s3_refusals_are_one_line_naming_the_url_before_anything_is_created(case, pattern, sample_dataset, s3_url,
                                                                             monkeypatch, capfd):
    url = {"bucket": "s3://no-such-bucket/cache.zarr", "url": "s3://ab/cache.zarr"}.get(case, s3_url)
    if case == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    if case == "endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    if case == "no keys":  # nor ~/.aws files, nor an EC2 instance's
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            monkeypatch.setenv(name, str(sample_dataset / "absent"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for args in (["build", str(sample_dataset), "--out", url, "--teachers", "tiny"], ["info", url], ["verify", url]):
        line = _one_line(CliRunner().invoke(cache_app, args))
        assert url in line and re.search(pattern, line), line
    assert not any(noise in capfd.readouterr().err for noise in AWS_NOISE)
    monkeypatch.undo()
    if case != "url":
        assert location(s3_url).names() == set()  # nothing was created
