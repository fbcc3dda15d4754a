"""What the weight-path tests share: a set of tensors of every awkward size, a written dump
of them (the ``fvw`` fixture, once per checksum algorithm), small transfer settings, layouts
for the planner and a bit flipper. Not a conftest: ``tests/conftest.py`` is the one conftest
(tests import ``need`` from it by name)."""

from __future__ import annotations

import pytest

from conftest import flip_bit, need  # noqa: F401 - flip_bit: for the tests that import it from here

torch = need("torch", "the weight path works on torch tensors")

from fvboot import checksums  # noqa: E402
from fvboot import weights as wf  # noqa: E402
from fvboot.weights import fileformat  # noqa: E402
from fvboot.weights.settings import Config  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20


def sample_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(3 * MIB // 2 + 333, generator=g).to(torch.bfloat16),  # ~3 MiB
        "norm": torch.randn(77, generator=g),
        "mid": torch.randint(0, 255, (MIB + 5,), generator=g, dtype=torch.uint8),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "huge": torch.randn(5 * MIB // 4 + 1, generator=g),  # ~5 MiB float32
        **{f"small{i}": torch.randn(i + 1, generator=g) for i in range(20)},
    }


def write_dump(path, src, checksum, **kw):
    """``write_weights`` with CHECKSUM; the test is skipped where that algorithm is missing."""
    if checksum == "blake3" and fileformat.blake3 is None:
        pytest.skip("the blake3 package is not installed (vLLM's images bring it)")
    if checksum == "xxh3" and checksums._xxhash() is None:
        pytest.skip(f"{checksums.XXHASH_LIBRARY} is not installed on this machine")
    return wf.write_weights(path, src.items(), checksum=checksum, **kw)


@pytest.fixture(params=["blake3", "crc32", "xxh3"])
def fvw(tmp_path, request):
    src = sample_tensors()
    path = tmp_path / "rank0.fvw"
    write_dump(path, src, request.param)
    return path, src


def small_config(**kw):
    base = dict(buffers=3, buffer_mb=1, threads=3, streams=2)
    base.update(kw)
    return Config(**base)




def entry(key, offset, nbytes):
    return wf.WeightEntry(key=key, dtype="uint8", shape=(nbytes,), offset=offset, nbytes=nbytes,
                          checksum="")


def check_invariants(spans, chunks, chunk_bytes, align=4096):
    """Every byte of every span lands exactly once, in order; chunks are aligned reads."""
    seen = {i: [] for i, (_, n) in enumerate(spans) if n}
    last_end = -1
    for c in chunks:
        assert c.offset % align == 0
        assert c.offset >= last_end, "chunks overlap or go backwards"
        last_end = c.offset + c.length
        assert 0 < c.length <= chunk_bytes
        assert c.read_length % align == 0 and c.length <= c.read_length <= chunk_bytes
        assert c.pieces and c.length == c.pieces[-1].buf + c.pieces[-1].length
        at = 0
        for p in c.pieces:
            assert p.buf >= at, "pieces overlap inside a buffer"
            at = p.buf + p.length
            off, n = spans[p.entry]
            assert c.offset + p.buf == off + p.src, "buffer position != file position"
            assert p.length > 0 and p.src + p.length <= n
            seen[p.entry].append(p)
    for i, ps in seen.items():
        assert [p.seq for p in ps] == list(range(len(ps)))
        pos = 0
        for p in ps:
            assert p.src == pos
            pos += p.length
        assert pos == spans[i][1]


def layout(sizes, align=4096, start=4096):
    spans, off = [], start
    for n in sizes:
        spans.append((off, n))
        off = (off + n + align - 1) // align * align
    return spans
