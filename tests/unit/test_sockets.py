"""The network addresses a checkpoint needs (fvboot.sockets): which count (not loopback, not the
wildcard) and whether this network namespace has them, with real sockets. Reading them from
CRIU's own images is tested end to end, with the image's CRIU (tests/e2e/socket_addresses_tree.py)."""

from __future__ import annotations

import socket

import pytest

from fvboot.sockets import bound_addresses, missing_here, needs_this_network


@pytest.mark.parametrize("address, needed", [
    ("0.0.0.0", False), ("127.0.0.1", False), ("127.0.1.1", False), ("::", False), ("::1", False),
    ("::ffff:127.0.0.1", False), ("172.17.0.2", True), ("10.0.3.7", True), ("fd00::5", True),
    ("::ffff:10.0.3.7", True),
])
def test_only_addresses_other_than_loopback_and_the_wildcard_tie_a_checkpoint_to_a_network(address, needed):
    assert needs_this_network(address) is needed


def test_an_address_this_namespace_has_is_not_missing_and_one_it_lacks_is():
    # 203.0.113.0/24 and 2001:db8::/32 are for documentation: no network holds them
    assert missing_here(["127.0.0.1", "203.0.113.77", "2001:db8::77"]) == ["203.0.113.77", "2001:db8::77"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the kernel picks the source address
            own = s.getsockname()[0]
        except OSError:
            pytest.skip("no route off this machine: no address of its own to bind")
    assert missing_here([own]) == []


def test_images_without_a_files_image_hold_no_sockets(tmp_path):
    assert bound_addresses(tmp_path) == ()
