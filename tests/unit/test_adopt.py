"""fvboot.adopt: a sleeping engine's memory made by the stager and adopted by the worker. Here
without a GPU: descriptors really taken from another process (pidfd_getfd), and vLLM's
create_and_map answered for an adopted allocation (mapped, its handle kept where vLLM keeps it)
or passed on to vLLM's own for anything else, including what does not fit or map. The driver
calls themselves run on the GPU: bench/gpu_vmm_adopt.py."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import types

import pytest

from fvboot.adopt import AdoptedMemory, adopt, install, take_fds
from fvboot.cuda_driver import CudaError


def _holder():
    """A process holding a pipe's write end (descriptor said on stdout) until its stdin closes."""
    script = ("import os, sys\nr, w = os.pipe()\nprint(w, flush=True)\nsys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def test_descriptors_are_taken_from_another_process():
    p, fd = _holder()
    try:
        [mine] = take_fds(p.pid, [fd])
        assert os.fstat(mine).st_ino == os.stat(f"/proc/{p.pid}/fd/{fd}").st_ino  # the same pipe
        os.write(mine, b"x")  # the pipe's write end, now ours too
        os.close(mine)
        with pytest.raises(OSError, match=f"pidfd_getfd of descriptor 999 of process {p.pid}"):
            take_fds(p.pid, [fd, 999])
    finally:
        p.stdin.close()
        p.wait(10)


class _Driver:
    def __init__(self, fail_map=()):
        self.imported, self.mapped, self.released, self.fail_map = [], [], [], set(fail_map)

    def import_fd(self, fd):
        self.imported.append(fd)
        return 1000 + len(self.imported)

    def map(self, va, n, handle, device):
        if va in self.fail_map:
            raise CudaError("cuMemMap: CUDA_ERROR_INVALID_VALUE (1)")
        self.mapped.append((va, n, handle, device))

    def release(self, handle):
        self.released.append(handle)


def test_vllms_wake_maps_an_adopted_allocation_and_keeps_its_handle_where_vllm_does():
    drv, calls = _Driver(fail_map={0x3000}), []
    adopted = AdoptedMemory(drv)
    for ptr, fd in ((0x1000, 5), (0x2000, 6), (0x3000, 7)):
        adopted.add(ptr, 4096, fd)
    wake = adopted.create_and_map(lambda h: calls.append(h))
    keep = [ctypes.c_uint64(0) for _ in range(5)]
    handle = lambda ptr, n, k: (0, n, ptr, ctypes.addressof(keep[k]))  # noqa: E731
    wake(handle(0x1000, 4096, 0))  # adopted: mapped, its handle kept for vLLM's later release
    assert drv.mapped == [(0x1000, 4096, 1001, 0)] and keep[0].value == 1001 and calls == []
    wake(handle(0x9000, 4096, 1))  # not adopted: vLLM creates it
    wake(handle(0x2000, 8192, 2))  # another size than adopted: released, vLLM creates it
    wake(handle(0x3000, 4096, 3))  # a map that fails: released, vLLM creates it
    assert [h[2] for h in calls] == [0x9000, 0x2000, 0x3000] and drv.released == [1002, 1003]
    assert adopted.mapped == 1 and adopted.waiting == {} and keep[2].value == 0


def test_install_replaces_an_earlier_install_and_never_stacks():
    module = types.SimpleNamespace(create_and_map=lambda h: "vllm")
    first, second = AdoptedMemory(_Driver()), AdoptedMemory(_Driver())
    install(first, module)
    install(second, module)
    assert module.create_and_map((0, 1, 0x5000, 0)) == "vllm"  # second's, passing on to vLLM's own
    assert module._fv_vllm_create_and_map((0, 1, 0, 0)) == "vllm"


def test_a_pool_that_does_not_match_what_is_asleep_is_refused_before_anything_is_taken():
    module = types.SimpleNamespace(create_and_map=lambda h: None)
    drv = _Driver()
    with pytest.raises(ValueError, match="the stager made 8192 bytes for 0x2000, which the engine does not have asleep"):
        adopt(drv, os.getpid(), [(0x1000, 4096, 3), (0x2000, 8192, 4)], {0x1000: 4096, 0x2000: 4096}, module)
    assert drv.imported == [] and not hasattr(module, "_fv_vllm_create_and_map")


def test_a_matching_pool_is_taken_imported_and_installed():
    p, fd = _holder()
    try:
        module = types.SimpleNamespace(create_and_map=lambda h: None)
        drv = _Driver()
        out = adopt(drv, p.pid, [(0x1000, 4096, fd)], {0x1000: 4096, 0x2000: 8192}, module)
        assert out["adopted"] == 1 and out["bytes"] == 4096 and len(drv.imported) == 1
        assert module._fv_vllm_create_and_map is not None
    finally:
        p.stdin.close()
        p.wait(10)


HELPER = r"""
import json, os, sys
from fvboot.cuda_driver import Driver
sizes = json.loads(sys.argv[1])
drv = Driver(); drv.init(); drv.use_primary_context(0)
handles, fds = [], []
for k, n in enumerate(sizes):
    h = drv.create(n, 0)
    va = drv.reserve(n); drv.map(va, n, h, 0); drv.memset(va, k + 1, n); drv.unmap(va, n); drv.address_free(va, n)
    handles.append(h); fds.append(drv.export_fd(h))
print(json.dumps({"pid": os.getpid(), "fds": fds}), flush=True)
sys.stdin.readline()
for h in handles:
    drv.release(h)
"""


@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs a CUDA GPU")
def test_gpu_memory_made_by_another_process_is_adopted_at_the_kept_addresses():
    """The whole of fvboot.adopt with the real driver: a helper process creates, fills and
    exports two allocations; this process, holding reserved addresses as a sleeping engine
    does, adopts them; the wake's create_and_map maps them there (the bytes are the helper's,
    the handle kept where vLLM keeps it), and they stay after the helper has gone."""
    from fvboot.cuda_driver import Driver

    drv = Driver()
    drv.init()
    drv.use_primary_context(0)
    gran = drv.granularity(0)
    sizes = [gran, 2 * gran]
    vas = [drv.reserve(n) for n in sizes]
    keep = [ctypes.c_uint64(0) for _ in sizes]
    helper = subprocess.Popen([sys.executable, "-c", HELPER, json.dumps(sizes)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        said = json.loads(helper.stdout.readline())
        module = types.SimpleNamespace(create_and_map=lambda h: pytest.fail(f"vLLM asked to create {h}"))
        out = adopt(drv, said["pid"], [(va, n, fd) for va, n, fd in zip(vas, sizes, said["fds"])],
                    dict(zip(vas, sizes)), module)
        assert out["adopted"] == 2 and out["bytes"] == sum(sizes)
        for va, n, k in zip(vas, sizes, keep):
            module.create_and_map((0, n, va, ctypes.addressof(k)))
        helper.stdin.write("done\n")
        helper.stdin.flush()
        assert helper.wait(60) == 0
        buf = ctypes.create_string_buffer(64)
        for i, (va, n) in enumerate(zip(vas, sizes)):
            drv.copy_to_host(ctypes.addressof(buf), va + n - 64, 64)
            assert buf.raw == bytes([i + 1]) * 64  # the helper's bytes, after the helper is gone
        for va, n, k in zip(vas, sizes, keep):
            drv.unmap(va, n)
            drv.release(k.value)  # as vLLM's sleep would, with the handle kept for it
            drv.address_free(va, n)
    finally:
        if helper.poll() is None:
            helper.kill()
