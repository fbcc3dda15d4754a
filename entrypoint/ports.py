"""Whether the server's port can be listened on here, asked before anything starts on it. With
the host's network (`docker run --network host`, Kubernetes hostNetwork) another process of the
host may hold it: then CRIU cannot put the checkpoint's listening socket back, and a normal start
would spend its imports only for vLLM to fail on bind with a traceback. A server that answers on
the port is not taken for ours either (control.ServerControl.wait_healthy); this check also
catches what does not speak HTTP."""

from __future__ import annotations

import errno
import socket
from typing import Optional

from .errors import PortTaken
from .launcher import arg_value, running_server, server_port


ONE_SERVER = "one start serves at a time; another start needs a container of its own"


def taken(port: int, host: Optional[str] = None) -> Optional[str]:
    """Why vLLM could not listen on HOST:PORT here (it binds with SO_REUSEADDR, as this does: a
    closed server's TIME_WAIT is no conflict), or None. Errors other than the port being in use
    (an address this network lacks, ...) are left for vLLM or CRIU to say."""
    found = _holder(port, host)
    return found and found[0]


def _holder(port: int, host: Optional[str]) -> Optional[tuple[str, bool]]:
    """(why PORT is taken, whether by the server fvboot serves in this container already), or None."""
    host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return None
            server = running_server()  # `docker exec C fvboot` beside the container's own server
            if server is not None:
                return (f"port {port} is taken by the server fvboot serves here already (its served tree's init is"
                        f" pid {server}): {ONE_SERVER}", True)
            return (f"port {port} is taken in this container's network (with --network host, by a process of the"
                    f" host: `ss -ltnp 'sport = :{port}'` names it)", False)
    return None


def check_serving_port(cmd: list[str]) -> None:
    """PortTaken, with what to do, if vLLM's command CMD could not listen on its port here."""
    port = server_port(cmd)
    found = _holder(port, arg_value(cmd, "--host"))
    if found and found[1]:  # another container is the answer, not another port
        raise PortTaken(found[0])
    if found:
        raise PortTaken(f"{found[0]}, so vLLM cannot listen on it: free the port, or give the container a network"
                        f" of its own (docker run -p HOST_PORT:{port})")
