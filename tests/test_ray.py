"""Ray addresses and cluster sizes are checked from the driver: one line within seconds, where Ray would print
warnings for a minute or wait forever."""

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from radio_distill import _ray
from radio_distill._ray import check_address, check_room
from radio_distill.errors import RadioDistillError


@pytest.mark.parametrize("address", ["garbage", "head:port", ":6379", "10.0.0.1:"])
def test_an_address_that_is_no_host_and_port_is_one_line(address):
    with pytest.raises(RadioDistillError, match=f"^--address '{address}': expected HOST:PORT of a Ray cluster's head"):
        check_address(address)  # was ValueError: Invalid address format


def test_a_server_that_is_not_ray_is_one_line_within_seconds(monkeypatch):
    monkeypatch.setattr(_ray, "ANSWER_S", 0.5)
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # e.g. Ray's dashboard port given by mistake
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_port}"
    start = time.monotonic()
    try:
        with pytest.raises(RadioDistillError, match=f"^--address {address}: something listens there, but not a Ray "
                                                    "cluster's head"):
            check_address(address)  # ray.init warned for 60 s, then raised ConnectionError
    finally:
        server.shutdown()
    assert time.monotonic() - start < 3


def test_a_ray_head_and_the_addresses_ray_resolves_pass(ray_session):
    import ray

    for address in (ray.get_runtime_context().gcs_address, None, "auto", "local", "ray://head:10001"):
        check_address(address)


def test_workers_a_cluster_cannot_place_are_refused_or_waited_for_when_it_may_grow(capsys):
    with pytest.raises(RadioDistillError, match=r"^--ray-workers 4 needs 4 CPU in the Ray cluster, which has 2; "
                                                "ask for fewer, or add nodes$"):
        check_room({"CPU": 4.0}, {"CPU": 2.0, "memory": 1e9}, asked="--ray-workers 4", may_grow=False)
    check_room({"GPU": 2.0}, {"CPU": 8.0}, asked="--ray-workers 2", may_grow=True)
    assert "warning: --ray-workers 2 needs 2 GPU in the Ray cluster, which has 0 now; waiting" in capsys.readouterr().err
    check_room({"CPU": 2.0}, {"CPU": 2.0}, asked="--ray-workers 2", may_grow=False)
