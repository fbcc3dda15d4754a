"""What the CPU and GPU weight collections (``cpu``, ``gpu``) share: the record of one storage
they dump and refill, the error they raise, a cheap fingerprint to compare weights before a
dump and after a load, and handing freed heap back to the kernel."""

from __future__ import annotations

import ctypes
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from .fileformat import flat_bytes


class WeightCollectionError(RuntimeError):
    """Something the forward pass reads could not be made releasable."""


@dataclass
class Storage:
    key: str
    tensor: torch.Tensor  # what is dumped/filled: the tensor itself, or a uint8 view of it all
    storage: torch.UntypedStorage  # identity kept: data_ptr() is 0 for every released storage
    nbytes: int


def storage_of(key: str, t: torch.Tensor, st: torch.UntypedStorage, nbytes: int) -> Storage:
    """The record for T's storage ST: T itself when it covers the storage exactly, else a
    uint8 view of the whole storage (keyed ``KEY#storage``), so every byte is dumped."""
    whole = (t.is_contiguous() and t.storage_offset() == 0
             and t.numel() * t.element_size() == nbytes)
    view = t.detach() if whole else torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
    return Storage(key if whole else f"{key}#storage", view, st, nbytes)


def fingerprint(tensors: list[tuple[str, torch.Tensor]], samples: int = 1 << 20,
                detail: bool = False) -> dict[str, Any]:
    """Cheap checksum of weights, computed where they live: per storage, the byte sum and a
    position-weighted byte sum over a strided sample (<= ``samples`` bytes, all of a small
    one). Exact integer arithmetic; one device-to-host transfer for the whole set."""
    keys, sums, total, sampled = [], [], 0, 0
    for key, t in tensors:
        flat = flat_bytes(t)
        n = flat.numel()
        if n == 0:
            continue
        step = -(-n // samples)
        s = flat[::step].to(torch.int64)
        w = torch.arange(s.numel(), device=s.device, dtype=torch.int64) % 65521 + 1
        sums.append(torch.stack([s.sum(), (s * w).sum()]))
        keys.append(key)
        total += n
        sampled += s.numel()
    values = torch.stack(sums).tolist() if sums else []
    digest = hashlib.sha256(json.dumps([keys, values]).encode()).hexdigest()[:32]
    out: dict[str, Any] = {"fingerprint": digest, "storages": len(keys), "bytes": total,
                           "sampled_bytes": sampled}
    if detail:
        out["per_key"] = {k: v for k, v in zip(keys, values)}
    return out


def malloc_trim() -> None:
    """Return freed heap to the kernel: glibc keeps it mapped (and CRIU would dump it)."""
    libc = ctypes.CDLL(None)
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        fn = getattr(libc, name, None)  # tcmalloc (vLLM suggests LD_PRELOADing it), glibc
        if fn is not None:
            fn(*args)
