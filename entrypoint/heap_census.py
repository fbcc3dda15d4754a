"""What a process's heap holds, for the checkpoint's size: CRIU dumps the engine's live heap
(0.76 GB of the 3B engine's 1.57 GB on an H200) and its large allocations, which malloc maps
one by one (0.25 GB there). Taken by the worker's trim before the checkpoint and kept in the
manifest (``trim[].heap``): a diagnostic, never a reason for the bake to fail.

- malloc's bytes in use, free and mapped (glibc's mallinfo2, every arena);
- Python's objects by type: their count and own sizes (what they point to in C is not counted,
  nor a tensor's or storage's memory off the CPU), the objects vLLM froze after its start-up
  included (``gc.freeze``: the census saw 3 190 objects of the 3B engine without them);
- ELF images held as ``bytes`` (GPU code: a compiled kernel's cubin is one), with the bytes
  each kind of holder holds (a dict's key and the object it was reached from, else the
  holder's type): 477 cubins (324 MB) were found in the 3B engine's
  anonymous memory by ``bench/checkpoint_anatomy.py``, and whether Python or the driver holds
  them decides whether they can be let go before the checkpoint.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections import Counter
from typing import Any

TOP = 12  # the Python types a census names
HOLDERS = 8  # the kinds of holders of ELF images it names, by bytes held
ELF = b"\x7fELF"


def census() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        malloc = _malloc()
        if malloc:
            out["malloc"] = malloc
        out.update(_python())
    except Exception as e:  # noqa: BLE001 - a diagnostic: the bake goes on without it
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _malloc() -> dict[str, int]:
    info = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if info is None:  # glibc 2.33+; absent under tcmalloc's LD_PRELOAD
        return {}

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    info.restype = MallInfo2
    m = info()
    return {"in_use_bytes": m.uordblks, "free_bytes": m.fordblks, "mmapped_bytes": m.hblkhd, "arena_bytes": m.arena}


def _all_objects() -> tuple[list, int]:
    """Every object the collector tracks, the frozen ones too (unfrozen for the count and
    frozen again, no collection between: what vLLM froze stays, garbage or not), and how many
    were frozen."""
    frozen = gc.get_freeze_count()
    collecting = gc.isenabled()
    gc.disable()
    if frozen:
        gc.unfreeze()  # get_objects() leaves the permanent generation out
    try:
        return gc.get_objects(), frozen
    finally:
        if frozen:
            gc.freeze()  # as vLLM left them (the objects of the young generations with them)
        if collecting:
            gc.enable()


def _python() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    device_types = (torch.Tensor, torch.UntypedStorage, torch.TypedStorage) if torch else ()
    by_type: dict[str, list[int]] = {}
    elf = [0, 0]  # count, bytes
    holders: Counter = Counter()

    def size(o: Any) -> int:
        if device_types and issubclass(type(o), device_types) and o.device.type != "cpu":
            return object.__sizeof__(o)  # their __sizeof__ adds the device memory they hold
        return sys.getsizeof(o, 0)

    def count(o: Any) -> None:
        entry = by_type.setdefault(type(o).__name__, [0, 0])
        entry[0] += 1
        entry[1] += size(o)

    objects, frozen = _all_objects()
    seen: set[int] = set()
    for o in objects:
        count(o)
        # and what it holds that the collector does not track (str, bytes; dicts and tuples
        # of only such, which CPython stops tracking), followed down through those
        todo = [o]
        while todo:
            holder = todo.pop()
            for r in gc.get_referents(holder):
                if _is_elf(r):
                    holders[_holder(holder, r, o)] += len(r)
                if gc.is_tracked(r) or id(r) in seen:
                    continue
                seen.add(id(r))
                count(r)
                if _is_elf(r):
                    elf[0] += 1
                    elf[1] += len(r)
                elif type(r) in (dict, tuple):
                    todo.append(r)
    top = sorted(by_type.items(), key=lambda kv: -kv[1][1])[:TOP]
    return {"frozen_objects": frozen,
            "python": {"objects": len(objects) + len(seen), "bytes": sum(b for _, b in by_type.values()),
                       "top": [[name, n, b] for name, (n, b) in top]},
            "elf_images": {"count": elf[0], "bytes": elf[1], "held_by": holders.most_common(HOLDERS)}}


def _is_elf(o: Any) -> bool:
    return type(o) is bytes and len(o) >= 64 and o[:4] == ELF  # 64: an ELF header's size


def _holder(o: Any, r: bytes, owner: Any) -> str:
    """What holds R: a dict by key, "dict['KEY']", prefixed with the type of the tracked object
    it was reached from where that is another (a compiled kernel's dict of its stages, say);
    anything else, its type's name."""
    if type(o) is dict:
        for k, v in o.items():
            if v is r:
                name = f"dict[{k!r}]"
                return (name if owner is o else f"{type(owner).__name__}>{name}")[:100]
    return type(o).__name__
