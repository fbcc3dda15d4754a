"""The checksum algorithms the bake records and the restore checks by: XXH3 through the
system's xxHash library gives the reference digests for every kind of buffer the readers hand
it, and a machine without the library neither offers nor accepts it."""

from __future__ import annotations

import ctypes
import os

import pytest

from fvboot import checksums
from fvboot.residency import FileMapping

needs_xxhash = pytest.mark.skipif(checksums._xxhash() is None,
                                  reason=f"{checksums.XXHASH_LIBRARY} is not installed on this machine")

# XXH3 64-bit digests of the xxHash project's reference implementation (the `xxhash` module on
# PyPI, 4.1.0) for bytes 0, 1, 2, ... 255, 0, 1, ... of these lengths
REFERENCE = {0: "2d06800538d394c2", 1: "c44bdff4074eecdb", 12293: "2abd826740d0a3f7"}


def _counting(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


@needs_xxhash
@pytest.mark.parametrize("n", sorted(REFERENCE))
def test_xxh3_gives_the_reference_digest(n):
    assert checksums.digest("xxh3", _counting(n)) == REFERENCE[n]


@needs_xxhash
def test_xxh3_digests_every_kind_of_buffer_the_readers_hand_it_alike(tmp_path):
    """bytes, a slice of them (read-only), a bytearray, a slice of one, a ctypes array and a
    read-only mapping of a file (the in-place check's view), in one update or in several."""
    data = _counting(12293)
    want = REFERENCE[12293]
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    mapping = FileMapping(fd, len(data))
    try:
        buffers = [data, memoryview(b"x" + data)[1:], bytearray(data), memoryview(bytearray(b"x" + data))[1:],
                   (ctypes.c_char * len(data)).from_buffer_copy(data), mapping.view(0, len(data))]
        for buf in buffers:
            assert checksums.digest("xxh3", buf) == want, type(buf)
        h = checksums.hasher("xxh3")
        for off in range(0, len(data), 5000):
            h.update(mapping.view(off, min(5000, len(data) - off)))
        assert h.hexdigest() == want
    finally:
        mapping.close()
        os.close(fd)


@needs_xxhash
def test_one_flipped_bit_changes_the_xxh3_digest():
    data = bytearray(os.urandom(1 << 20))
    before = checksums.digest("xxh3", data)
    data[777_777] ^= 0x10
    assert checksums.digest("xxh3", data) != before


def test_without_the_library_xxh3_is_neither_offered_nor_accepted(monkeypatch):
    """A restore whose manifest names xxh3 on a machine without xxHash gets UnknownChecksum (the
    check fails, the fallback starts vLLM); the bake of such a machine records another."""
    monkeypatch.setattr(checksums, "XXHASH_LIBRARY", "libfv-no-such-library.so.0")
    checksums._xxhash.cache_clear()
    checksums.fastest_checksum.cache_clear()
    try:
        with pytest.raises(checksums.UnknownChecksum, match="'xxh3' is not available here"):
            checksums.hasher("xxh3")
        assert checksums.fastest_checksum() in ("blake3", "crc32")
    finally:
        checksums._xxhash.cache_clear()
        checksums.fastest_checksum.cache_clear()
