"""bench/checkpoint_anatomy.py's scan for GPU code in a process's memory: ELF images (CUDA
cubins apart) and CUDA fatbins found at any offset, counted with the sizes their headers claim;
bytes that only look like a header's start are not counted."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from checkpoint_anatomy import EM_CUDA, FATBIN_MAGIC, GPU_LIBRARY, PAGE, embedded_images, shared_memory  # noqa: E402
from fvboot.criu import PE_PRESENT, encode_fields  # noqa: E402


def _elf(machine: int, shoff: int, shnum: int) -> bytes:
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<H", head, 0x12, machine)
    struct.pack_into("<QQ", head, 0x20, 64, shoff)  # program headers right after, sections at shoff
    struct.pack_into("<HHHH", head, 0x36, 56, 1, 64, shnum)
    return bytes(head)


def _fatbin(fat: int) -> bytes:
    return FATBIN_MAGIC + struct.pack("<HHQ", 1, 16, fat)


def test_cubins_other_elf_and_fatbins_are_told_apart_and_sized():
    data = (b"\0" * 40 + _elf(EM_CUDA, 10_000, 10) + b"x" * 100 + _elf(62, 500, 4)
            + b"\0" * 8 + _fatbin(123_456) + b"\0" * 64)
    found = embedded_images(data)
    assert found == {"cubin": 1, "cubin_bytes": 10_000 + 640, "other_elf": 1, "other_elf_bytes": 500 + 256,
                     "fatbin": 1, "fatbin_bytes": 16 + 123_456}


def test_what_only_looks_like_a_header_is_not_counted():
    data = (b"\x7fELF\x02\x01" + b"\0" * 100  # an ELF header that claims no size
            + FATBIN_MAGIC + struct.pack("<HHQ", 7, 16, 10)  # another fatbin version
            + _elf(EM_CUDA, 1 << 40, 1)  # an absurd size
            + b"\x7fELF\x02\x01")  # cut off by the end of the data
    assert embedded_images(data) == {}


def test_the_gpu_libraries_a_process_maps_are_named_and_nothing_else():
    """A process that maps libcuda has started CUDA's driver (whose host memory the checkpoint
    carries); PyTorch's own libraries, which every process that imports torch maps, are not
    named."""
    named = {"/usr/local/nvidia/lib64/libcuda.so.580.65.06": "libcuda.so.580.65.06",
             "/usr/local/nvidia/lib64/libnvidia-ml.so.1": "libnvidia-ml.so.1",
             "/v/site-packages/nvidia/cu13/lib/libcublasLt.so.13": "libcublasLt.so.13",
             "/v/site-packages/nvidia/cudnn/lib/libcudnn_engines_precompiled.so.9": "libcudnn_engines_precompiled.so.9",
             "/v/site-packages/torch/lib/libtorch_cuda.so": None,
             "/v/site-packages/torch/lib/libc10_cuda.so": None,
             "/usr/lib/x86_64-linux-gnu/libcudaxyz.so": None,
             "/usr/lib/x86_64-linux-gnu/libz.so.1": None}
    for path, want in named.items():
        m = GPU_LIBRARY.search(path)
        assert (m.group(0)[1:] if m else None) == want, path


def test_shared_memory_pages_stored_apart_from_every_process_are_counted(tmp_path):
    """CRIU stores a shared segment's pages once, under pagemap-shmem-<id>.img, in no process's
    pagemap (a GPU engine has such segments): every byte of its pages-N.img is counted, the
    all-zero pages among them said."""
    magic = b"\x54\x56\x01\x00\x12\x34\x56\x78"
    entries = [encode_fields([(1, 7)]),  # pages in pages-7.img
               encode_fields([(1, 0), (4, PE_PRESENT), (5, 2)]),
               encode_fields([(1, 5 * PAGE), (4, PE_PRESENT), (5, 1)])]
    with open(tmp_path / "pagemap-shmem-4242.img", "wb") as f:
        f.write(magic + b"".join(len(m).to_bytes(4, "little") + m for m in entries))
    (tmp_path / "pages-7.img").write_bytes(b"\1" * PAGE + bytes(PAGE) + b"\2" * PAGE)
    (tmp_path / "pagemap-12.img").write_bytes(magic)  # a process's own pagemap: not shared memory
    assert shared_memory(tmp_path) == [{"segment": "4242", "dumped": 3 * PAGE, "zero": PAGE}]
