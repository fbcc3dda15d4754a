"""fvboot.ports with real sockets: a port another process listens on is named, with the command
that finds the process; a free one, or one only a closed connection left in TIME_WAIT, is not."""

import shutil
import socket
import subprocess

import pytest

from fvboot import ports
from fvboot.errors import PortTaken
from fvboot.ports import check_serving_port, taken


@pytest.fixture(autouse=True)
def no_served_tree_here(monkeypatch):
    """As in a container of its own: no fvboot served tree in this PID namespace (on this host,
    a test or CI run beside may have one)."""
    monkeypatch.setattr(ports, "running_server", lambda: None)


def _listener(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vLLM's server binds
    s.bind((host, 0))
    s.listen(1)
    return s


def test_a_port_another_process_listens_on_is_named_with_how_to_find_it():
    with _listener("0.0.0.0") as other:
        port = other.getsockname()[1]
        problem = taken(port)
    assert problem.startswith(f"port {port} is taken in this container's network")
    assert f"ss -ltnp 'sport = :{port}'" in problem


def test_a_listener_on_loopback_only_still_blocks_the_wildcard_vllm_binds():
    with _listener("127.0.0.1") as other:
        assert taken(other.getsockname()[1], "0.0.0.0") is not None


def test_a_free_port_and_one_left_in_time_wait_are_not_taken():
    with _listener() as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    states = subprocess.run(["ss", "-tanH", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert "TIME-WAIT" in states or not shutil.which("ss")
    assert taken(port) is None


def test_the_serving_port_of_vllms_command_is_checked_with_what_to_do():
    with _listener("0.0.0.0") as other:
        port = other.getsockname()[1]
        with pytest.raises(PortTaken, match=rf"port {port} is taken.*docker run -p HOST_PORT:{port}"):
            check_serving_port(["vllm", "serve", "/fv/model", "--host", "0.0.0.0", "--port", str(port)])
    check_serving_port(["vllm", "serve", "/fv/model", f"--port={port}"])  # free again: no error


def test_an_address_this_network_lacks_is_left_for_vllm_to_say():
    assert taken(8000, "192.0.2.1") is None  # TEST-NET-1: EADDRNOTAVAIL, not a taken port


def test_a_dual_stack_server_finds_an_ipv4_listener_on_its_port():
    """`--host ::` (an IPv6-only cluster's image) binds IPv6 and IPv4: an IPv4 holder blocks it."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    with _listener("0.0.0.0") as other:
        try:
            assert taken(other.getsockname()[1], "::") is not None
        except OSError as e:  # an IPv6 socket cannot even be made here (ipv6.disable=1)
            pytest.skip(f"no IPv6 sockets here: {e}")


def test_a_port_this_containers_own_server_holds_is_said_to_be_its(monkeypatch):
    """`docker exec C fvboot` beside the container's own server (tried by hand, 2026-12-06): the
    port is its server's, not "a process of the host"'s, and freeing it is not the fix."""
    monkeypatch.setattr(ports, "running_server", lambda: 4242)
    with _listener("0.0.0.0") as other:
        port = other.getsockname()[1]
        assert taken(port) == (f"port {port} is taken by the server fvboot serves here already (its served tree's"
                               " init is pid 4242): one start serves at a time; another start needs a container of its"
                               " own")
        with pytest.raises(PortTaken) as e:
            check_serving_port(["vllm", "serve", "/fv/model", f"--port={port}"])
    assert "free the port" not in str(e.value) and "serves here already" in str(e.value)
    assert taken(port) is None  # free: nobody is blamed
