"""Ray clusters checked from the driver, so that a wrong `--address` or a cluster too small is one line within
seconds: `ray.init` retries an address for a minute, a warning a second, and Ray waits forever for workers
that a cluster cannot place; and what fails inside Ray told in one line."""

import os
import re
import sys

from .errors import RadioDistillError

ANSWER_S = 5.0  # seconds a Ray head gets to answer as a gRPC server


def check_address(address: str | None) -> None:
    """One line unless `address` is None, 'auto', 'local', a Ray client URL (ray://...), or HOST:PORT where a
    Ray head answers: something must listen there, and speak gRPC as Ray's GCS does (not HTTP, SSH...)."""
    if address in (None, "auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 host is written [::1]:6379
    if not host or not port.isdigit():
        raise RadioDistillError(f"--address {address!r}: expected HOST:PORT of a Ray cluster's head, e.g. "
                                "10.0.0.1:6379 as `ray start --head` prints it, or auto")
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RadioDistillError(f"no Ray cluster answers at --address {address} ({e.strerror or e}); start one with "
                                "`ray start --head`, or leave --address out to run Ray here") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):  # the plain gRPC probe below would fail
        return
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=ANSWER_S)
    except grpc.FutureTimeoutError:
        raise RadioDistillError(f"--address {address}: something listens there, but not a Ray cluster's head (no gRPC "
                                f"answer in {ANSWER_S:g} s); give the address `ray start --head` printed") from None
    finally:
        channel.close()


def check_room(need: dict[str, float], have: dict[str, float], *, asked: str, may_grow: bool) -> None:
    """One line when the cluster has less of a resource in all than `need` (what `asked`, an option, takes);
    only a warning when the cluster `may_grow` (an autoscaler adds nodes for what is waited for)."""
    for resource, amount in need.items():
        if amount > have.get(resource, 0):
            short = f"{asked} needs {amount:g} {resource} in the Ray cluster, which has {have.get(resource, 0):g}"
            if not may_grow:
                raise RadioDistillError(f"{short}; ask for fewer, or add nodes")
            print(f"warning: {short} now; waiting for it to grow (stop with Ctrl-C if it cannot)", file=sys.stderr)


def error_line(e: BaseException) -> str:
    """One line saying why a Ray task or actor failed: the original exception, not Ray's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        text = f"{type(cause).__name__}: {cause}"
    else:  # e.g. an actor whose __init__ raised: only the traceback's text is left; its exception line
        found = re.findall(r"^(?:\w+\.)*(\w+(?:Error|Exception)): (.*)$", str(e), re.M)
        text = f"{found[-1][0]}: {found[-1][1]}" if found else str(e)
    text = re.sub(r"\s*\[source locations=.*?\]", "", " ".join(text.split()))  # tensorstore's C++ file:line list
    return text if len(text) <= 320 else f"{text[:160]} ... {text[-155:]}"  # the OS error is at the end
