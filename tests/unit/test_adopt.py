"""fvboot.adopt: a sleeping engine's memory made by the stager and adopted by the worker. Here
without a GPU: descriptors really handed over a Unix socket to a process in a PID namespace of
its own (as the served tree is), and vLLM's create_and_map answered for an adopted allocation
(mapped, its handle kept where vLLM keeps it) or passed on to vLLM's own for anything else,
including what does not fit or map. The driver calls themselves run on the GPU (the last test
here, and bench/gpu_vmm_adopt.py)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import types

import pytest

from fvboot.adopt import AdoptedMemory, HandOver, adopt, install, receive_fds
from fvboot.cuda_driver import CudaError


@pytest.fixture
def sock_dir():
    """A short folder for sockets (a Unix socket's path has at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="fv-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


RECEIVER = r"""
import os, sys
from fvboot.adopt import receive_fds
fds = receive_fds(sys.argv[1], int(sys.argv[2]), timeout=10)
for fd in fds:
    os.write(fd, b"%d" % os.getpid())
print(len(fds), flush=True)
"""


def _own_pid_namespace() -> list[str]:
    """The argv prefix that starts a process in a PID namespace of its own, as fvboot starts the
    served tree; empty where this machine cannot (not root), said by the test's skip."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    return ["unshare", "--pid", "--fork"] if probe.returncode == 0 else []


def test_descriptors_are_handed_to_a_process_in_a_pid_namespace_of_its_own(sock_dir):
    """Where pidfd_getfd cannot reach (the worker is in the served tree's own PID namespace,
    the stager outside it): the worker receives the stager's descriptors over the socket, in
    their order, and they are the same open files; the stager's copies are closed once given."""
    prefix = _own_pid_namespace()
    if not prefix:
        pytest.skip("unshare --pid needs root here")
    pipes = [os.pipe() for _ in range(3)]
    path = os.path.join(sock_dir, "pool.sock")
    given = HandOver(path, [w for _, w in pipes])
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0  # the owner's only
    r = subprocess.run([*prefix, sys.executable, "-c", RECEIVER, path, "3"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
    said = [os.read(rd, 16) for rd, _ in pipes]
    assert said[0] == b"1" and len(set(said)) == 1  # PID 1 of its own namespace wrote each
    assert given.given and not os.path.exists(path)
    for _, w in pipes:
        with pytest.raises(OSError):
            os.fstat(w)  # the stager's copy, closed


def test_a_receiver_asking_for_more_than_is_given_is_told_and_keeps_nothing(sock_dir):
    rd, w = os.pipe()
    path = os.path.join(sock_dir, "pool.sock")
    HandOver(path, [w])
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="gave 1 of 2 descriptors and closed"):
        receive_fds(path, 2, timeout=10)
    assert set(os.listdir("/proc/self/fd")) <= before  # the one received, closed again
    with pytest.raises(OSError):  # given once: nobody else gets them
        receive_fds(path, 1, timeout=2)
    os.close(rd)


def test_a_hand_over_not_come_for_closes_its_descriptors_and_its_socket(sock_dir):
    rd, w = os.pipe()
    path = os.path.join(sock_dir, "pool.sock")
    h = HandOver(path, [w], wait=0.2)
    h._thread.join(5)
    assert not h.given and not os.path.exists(path)
    with pytest.raises(OSError):
        os.fstat(w)
    assert os.read(rd, 1) == b""  # the last write end is closed
    os.close(rd)


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


def test_a_pool_that_does_not_match_what_is_asleep_is_refused_before_anything_is_taken(sock_dir):
    module = types.SimpleNamespace(create_and_map=lambda h: None)
    drv = _Driver()
    with pytest.raises(ValueError, match="the stager made 8192 bytes for 0x2000, which the engine does not have asleep"):
        adopt(drv, os.path.join(sock_dir, "none.sock"), [(0x1000, 4096), (0x2000, 8192)],
              {0x1000: 4096, 0x2000: 4096}, module)
    assert drv.imported == [] and not hasattr(module, "_fv_vllm_create_and_map")


def test_a_matching_pool_is_received_imported_and_installed(sock_dir):
    rd, w = os.pipe()
    path = os.path.join(sock_dir, "pool.sock")
    HandOver(path, [w])
    module = types.SimpleNamespace(create_and_map=lambda h: None)
    drv = _Driver()
    out = adopt(drv, path, [(0x1000, 4096)], {0x1000: 4096, 0x2000: 8192}, module)
    assert out["adopted"] == 1 and out["bytes"] == 4096 and len(drv.imported) == 1
    assert module._fv_vllm_create_and_map is not None
    assert os.read(rd, 1) == b""  # the received copy was closed once imported (the import keeps the memory)
    os.close(rd)


HELPER = r"""
import json, os, sys
from fvboot.adopt import HandOver
from fvboot.cuda_driver import Driver
sizes = json.loads(sys.argv[1])
drv = Driver(); drv.init(); drv.use_primary_context(0)
handles, fds = [], []
for k, n in enumerate(sizes):
    h = drv.create(n, 0)
    va = drv.reserve(n); drv.map(va, n, h, 0); drv.memset(va, k + 1, n); drv.unmap(va, n); drv.address_free(va, n)
    handles.append(h); fds.append(drv.export_fd(h))
HandOver(sys.argv[2], fds)
print("ready", flush=True)
sys.stdin.readline()
for h in handles:
    drv.release(h)
"""


@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs a CUDA GPU")
def test_gpu_memory_made_by_another_process_is_adopted_at_the_kept_addresses(sock_dir):
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
    path = os.path.join(sock_dir, "pool.sock")
    # not in a PID namespace of its own: the driver refuses one without its own /proc (cuInit:
    # CUDA_ERROR_OPERATING_SYSTEM); the hand-over across namespaces is the first test's
    helper = subprocess.Popen([sys.executable, "-c", HELPER, json.dumps(sizes), path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout.readline().strip() == "ready"
        module = types.SimpleNamespace(create_and_map=lambda h: pytest.fail(f"vLLM asked to create {h}"))
        out = adopt(drv, path, list(zip(vas, sizes)), dict(zip(vas, sizes)), module)
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
