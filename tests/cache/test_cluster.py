"""`radio-cache build --address` against a real Ray cluster: a head and a second node started on this
machine with `ray start`, and the build run as users run it, by the console script in its own process."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from radio_distill.store import layout as L

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    """`ray start ... --block` in its own process group; returns it once the node is up, with its output."""
    proc = subprocess.Popen([str(BIN / "ray"), "start", *args, "--disable-usage-stats", "--block"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:  # `--block` prints this once every process of the node runs
        lines.append(line)
        if "will now block" in line:
            break
    if proc.poll() is not None:
        pytest.fail(f"ray start failed: {''.join(lines)[-2000:]}")
    return proc, "".join(lines)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, env) of a two-node Ray cluster of 1 CPU each. Stopped by signalling the `ray start --block`
    processes, which stop what they started: `ray stop` would stop every Ray on the machine."""
    # an explicit address never sends a token (Ray >= 2.5x), so the cluster runs without token auth
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp = tmp_path_factory.mktemp("ray")
    nodes = []
    try:
        head, out = _ray_start(["--head", f"--port={_free_port()}", "--num-cpus=1", "--include-dashboard=false",
                                f"--temp-dir={temp}"], env)
        nodes.append(head)
        address = re.search(r"ray start --address='([^']+)'", out).group(1)
        nodes.append(_ray_start([f"--address={address}", "--num-cpus=1", f"--temp-dir={temp}"], env)[0])
        yield address, env
    finally:
        for proc in reversed(nodes):
            proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_build_on_a_cluster_and_a_failing_shard(cluster, small_dataset, small_store, tmp_path, assert_same_store):
    address, env = cluster
    out = shutil.copytree(small_store, tmp_path / "cache.zarr")
    root = zarr.open_group(out, mode="r+")
    for name in ("clip", "dinov2", "sam"):  # every shard to do again, on the cluster
        root[L.done_array(name)][:] = 0
    blocker = out / L.target_array("sam", "spatial") / "c" / "2"  # a file where shard 2's folder must go
    shutil.rmtree(blocker)
    blocker.write_text("")
    command = [str(BIN / "radio-cache"), "build", str(small_dataset), "--out", str(out), "--teachers", "tiny",
               "--views", "2", "--shard-size", "2", "--workers", "2", "--address", address]

    failed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr  # neither ours nor Ray's echo of the workers'
    last = failed.stderr.splitlines()[-1]
    assert last.startswith("error: 1 of 4 shards failed (shard 2): ValueError: ") and "Not a directory" in last
    assert last.endswith(f"; fix it, then rerun: radio-cache build {' '.join(command[2:])}")
    assert "could not start" not in failed.stderr  # one actor on each 1-CPU node
    assert zarr.open_group(out, mode="r")[L.done_array("sam")][:].tolist() == [1, 1, 0, 1]

    blocker.unlink()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"store {out}: 8 samples x 2 views, complete" in " ".join(done.stdout.split())
    assert_same_store(out, small_store)
