"""The heap census the bake's trim records (what the checkpoint's largest part holds): frozen
objects counted and left frozen, a tensor's memory off the CPU not counted as heap, ELF images
held as bytes found with what holds them."""

from __future__ import annotations

import gc

import pytest

from fvboot import heap_census


def test_the_heap_census_counts_frozen_objects_and_leaves_them_frozen():
    """vLLM freezes the collector after its start-up; a census of gc.get_objects() alone saw
    3 190 objects of the 3B engine's heap. Frozen ones are counted, and stay frozen."""
    kept = [[i] for i in range(50_000)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        heap = heap_census.census()
        young = {id(o) for o in gc.get_objects()}  # the permanent generation left out
        assert not any(id(o) in young for o in kept)  # frozen again
        assert frozen >= heap["frozen_objects"] > 50_000  # (frozen ones may die by refcount meanwhile)
        assert heap["python"]["objects"] > heap["frozen_objects"]
        assert [n for name, n, _ in heap["python"]["top"] if name == "list"][0] > 50_000
    finally:
        gc.unfreeze()
    del kept


def test_the_heap_census_leaves_out_memory_a_tensor_holds_off_the_cpu():
    """A tensor's and a storage's __sizeof__ add the memory they hold, on whatever device: a
    GPU's weights and KV cache counted 120 GB of "Python heap". Off the CPU only the object is."""
    torch = pytest.importorskip("torch")
    big = torch.empty(1 << 36, dtype=torch.uint8, device="meta")  # 64 GiB, nowhere
    storage = big.untyped_storage()
    heap = heap_census.census()
    assert heap["python"]["bytes"] < 8 << 30, heap["python"]["top"]
    del big, storage


def test_elf_images_held_as_bytes_are_counted_with_what_holds_them():
    """A compiled kernel's cubin held by Python (a dict's "cubin", an attribute) is GPU code in
    the checkpoint: the census counts such images, their bytes, and names their holders."""
    class CompiledKernel:
        def __init__(self, cubin):
            self.asm = {"ptx": "// ptx", "cubin": cubin}  # only untracked values: untracked itself

    image = heap_census.ELF + bytes(range(256)) * 4096  # 1 MiB
    kernels = [CompiledKernel(image + bytes([i])) for i in range(3)]
    heap = heap_census.census()
    elf = heap["elf_images"]
    assert elf["count"] >= 3 and elf["bytes"] >= 3 * len(image), elf
    held = dict((name, n) for name, n in elf["held_by"])
    assert held.get("CompiledKernel>dict['cubin']") == 3 * (len(image) + 1), elf
    del kernels
