"""The network addresses a checkpoint needs: CRIU puts every socket back on the address it was
bound to, so a checkpoint holding a socket bound to the bake container's own address (its
bridge IP, or the host's with --network host) restores only where that address exists, and
nowhere else: not in a Kubernetes pod, not in another Docker network. The bake records such
addresses (and keeps the served tree on loopback so that there are none: launcher.server_env);
a restore where one is missing is refused before CRIU runs, by name."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Iterable

from .criu import image_entries, proto_fields
from .launcher import LOOPBACK_SETTINGS

# CRIU's images/fdinfo.proto: file_entry.isk = 4; images/sk-inet.proto: inet_sk_entry.family = 3,
# src_addr = 11 (repeated uint32, unpacked as CRIU writes it: the address's bytes in network
# order, 1 word for IPv4, 4 for IPv6)
_FILE_ISK, _ISK_FAMILY, _ISK_SRC_ADDR = 4, 3, 11
# what keeps a checkpoint free of such addresses, said where one is found (bake) or missing (restore)
KEPT_ON_LOOPBACK = ("fvboot keeps the server's sockets on loopback unless the image's environment sets "
                    + ", ".join(LOOPBACK_SETTINGS))


def _address(family: int, words: list[int]) -> str | None:
    if family == socket.AF_INET and len(words) == 1:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", words[0]))
    if family == socket.AF_INET6 and len(words) == 4:
        return socket.inet_ntop(socket.AF_INET6, struct.pack("<4I", *words))
    return None


def needs_this_network(address: str) -> bool:
    """Whether a socket bound to ADDRESS restores only where that address exists: any address
    but the wildcard and loopback (every network namespace has those)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_unspecified or ip.is_loopback)


def bound_addresses(images: Path) -> tuple[str, ...]:
    """The addresses, other than the wildcard and loopback, that the inet sockets in the CRIU
    images in IMAGES are bound to (listening or connected), sorted."""
    found: set[str] = set()
    files = images / "files.img"
    if not files.exists():
        return ()
    for entry in image_entries(files):
        isk = dict(proto_fields(entry)).get(_FILE_ISK)
        if not isinstance(isk, bytes):
            continue
        fields = proto_fields(isk)
        family = next((v for k, v in fields if k == _ISK_FAMILY), None)
        words = [v for k, v in fields if k == _ISK_SRC_ADDR and isinstance(v, int)]
        address = _address(family, words) if isinstance(family, int) else None
        if address and needs_this_network(address):
            found.add(address)
    return tuple(sorted(found))


def missing_here(addresses: Iterable[str]) -> list[str]:
    """Those of ADDRESSES this network namespace has not got (a socket cannot be bound to them)."""
    missing = []
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address, 0))
        except OSError:  # EADDRNOTAVAIL; EAFNOSUPPORT where the namespace has no IPv6
            missing.append(address)
    return missing
