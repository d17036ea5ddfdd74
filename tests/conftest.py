"""Fixtures shared by every test folder: one Ray session, a generated dataset, a tiny store built from it, and
a local S3 server for stores on object storage.

Ray starts once per session (5-10 s); `build_cache` reuses an initialised Ray. Everything lives in
pytest's temporary folders; the tiny teachers have seeded random weights, so nothing is downloaded.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.sample_data import make_sample_dataset

SAMPLE_IMAGES = 48  # labelled scenes; `write_bad_files` adds 10 odd files, 3 of them unreadable
TINY_STORE = dict(teachers="tiny", views=2, shard_size=4, workers=2)  # 58 samples -> 15 shards


@pytest.fixture(scope="session")
def ray_session():
    """Ray on 2 CPUs, started once (or the one already running). Worker logs stay out of the captured
    output (CLI tests read it); worker errors still reach the tests as exceptions."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """Image folder: 48 labelled 96 px JPEGs in 4 class subfolders (masks in ../masks), plus at the top
    level the bad files of `write_bad_files` (huge 12000x9000 JPEG included): empty.jpg, truncated.jpg
    and text.jpg are unreadable, the other 7 load as RGB."""
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), images=SAMPLE_IMAGES, bad=True, huge=True)


@pytest.fixture(scope="session")
def tiny_config(sample_dataset):
    """`tiny_config(out, **overrides)`: the CacheConfig of `tiny_store` (tiny teachers, 2 views, shards of 4)."""

    def make(out: Path, **overrides) -> CacheConfig:
        return load_cache_config(data=sample_dataset, out=out, **{**TINY_STORE, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_store(ray_session, tiny_config, tmp_path_factory) -> Path:
    """A complete store of `sample_dataset` by the three tiny teachers. Read-only: copy it to damage it."""
    out = tmp_path_factory.mktemp("tiny_store") / "cache.zarr"
    report = build_cache(tiny_config(out), progress=False)
    assert report["complete"], report
    return out


S3_BUCKET = "radio-test"


@pytest.fixture(scope="session")
def s3_env():
    """A local S3 server for the session: moto in server mode on 127.0.0.1 at a free port, checking
    credentials (IAM auth on after the 4 setup calls that make a key and the bucket). Its settings are
    set as the AWS_* environment variables for the rest of the session; the server stops at the end."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
            time.sleep(0.1)
    setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="radio")
    key = iam.create_access_key(UserName="radio")["AccessKey"]
    iam.put_user_policy(UserName="radio", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1"}
    boto3.client("s3", **{**setup, "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                          "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}).create_bucket(Bucket=S3_BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        yield env
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def s3_url(s3_env, request):
    """A fresh s3:// prefix on the session's S3 server, for this test's stores."""
    return f"s3://{S3_BUCKET}/{re.sub(r'[^A-Za-z0-9_.-]', '-', request.node.name)}"


@pytest.fixture(scope="session")
def record_again():
    """`record_again(store, array)`: record every done shard's file of `array` as it is now, as if its build had
    written those values (for tests that plant values to see what a reader does with them)."""
    import zarr

    from radio_distill.store import layout as L
    from radio_distill.store.group import shard_key
    from radio_distill.store.provenance import values_digest

    def record(store: Path, array: str) -> None:
        assert "/moments/" not in array, "arrays with a file per shard"
        root = zarr.open_group(store, mode="r+")
        n, size, shards = root.attrs["num_samples"], root.attrs["shard_size"], root[L.SHARDS]
        j = shards.attrs["arrays"].index(array)
        rows = shards[...]
        for k in range(shards.shape[0]):
            key = shard_key(root[array].metadata, array, k, shards.shape[0])
            rows[k, j] = (store / array / key).stat().st_size, values_digest(root[array][L.shard_rows(k, size, n)])
        shards[...] = rows

    return record
