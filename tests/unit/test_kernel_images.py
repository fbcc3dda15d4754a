"""FV_KERNEL_IMAGES: the bake's trim empties the GPU code Triton keeps on each compiled kernel
whose module the driver has loaded (the checkpoint's 477 cubins and their IRs), keeps it on a
kernel not loaded yet, and refuses a setting it does not know before vLLM starts. Triton's
CompiledKernel is stood in for on this CPU machine (Triton is not installed); on a GPU a real
Triton kernel runs the same after its images were let go."""

from __future__ import annotations

import gc
import sys
import types

import pytest

from fvboot import kernel_images
from fvboot.errors import BakeFailed

CUBIN = b"\x7fELF" + bytes(range(256)) * 1024


def test_the_bake_refuses_a_kernel_images_setting_it_does_not_know(monkeypatch):
    monkeypatch.delenv(kernel_images.ENV, raising=False)
    assert kernel_images.kernel_images_setting() == "drop"
    monkeypatch.setenv(kernel_images.ENV, " KEEP ")
    assert kernel_images.kernel_images_setting() == "keep"
    monkeypatch.setenv(kernel_images.ENV, "free")
    with pytest.raises(BakeFailed, match="FV_KERNEL_IMAGES='free': expected drop or keep"):
        kernel_images.kernel_images_setting()


class CompiledKernel:  # Triton's, as far as the trim reads it
    def __init__(self, loaded: bool, n: int):
        self.asm = {"ttir": "tt" * n, "ptx": "p" * n, "cubin": CUBIN + bytes([n % 256])}
        self.kernel = self.asm["cubin"]
        self.module = 0x7F00 if loaded else None
        self.function = 0x7F10 if loaded else None


@pytest.fixture
def fake_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton.compiler.compiler",
                        types.SimpleNamespace(CompiledKernel=CompiledKernel))
    monkeypatch.delenv(kernel_images.ENV, raising=False)


def test_loaded_kernels_lose_their_images_and_kernels_not_loaded_keep_them(fake_triton):
    loaded = [CompiledKernel(True, 1000 + i) for i in range(3)]
    pending = CompiledKernel(False, 7)
    gc.freeze()  # vLLM freezes what its start-up made: those kernels count too
    try:
        frozen = CompiledKernel(True, 2000)
        dropped = kernel_images.drop_loaded()
    finally:
        gc.unfreeze()
    assert dropped["kernels"] >= 4 and dropped["kept_not_loaded"] >= 1, dropped
    assert dropped["bytes"] >= sum(3 * (1000 + i) + len(CUBIN) + 1 for i in range(3)), dropped
    for k in loaded + [frozen]:
        assert k.asm == {} and k.kernel == b"" and k.module and k.function
    assert pending.asm["cubin"].startswith(CUBIN) and pending.kernel is pending.asm["cubin"]


def test_kept_where_the_bake_says_keep_or_where_triton_never_ran(fake_triton, monkeypatch):
    kernel = CompiledKernel(True, 10)
    monkeypatch.setenv(kernel_images.ENV, "keep")
    assert kernel_images.drop_loaded() == {}
    assert kernel.asm["cubin"].startswith(CUBIN)
    monkeypatch.delenv(kernel_images.ENV)
    monkeypatch.delitem(sys.modules, "triton.compiler.compiler")
    assert kernel_images.drop_loaded() == {}
    assert kernel.kernel.startswith(CUBIN)


def test_gpu_a_triton_kernel_runs_the_same_after_its_images_were_let_go(monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (Triton's kernels run only there)")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def scaled_add(x, y, out, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(out + i, tl.load(x + i, mask=m) * 3 + tl.load(y + i, mask=m), mask=m)

    monkeypatch.delenv(kernel_images.ENV, raising=False)
    x = torch.randn(10_000, device="cuda")
    y = torch.randn(10_000, device="cuda")

    def run():
        out = torch.empty_like(x)
        scaled_add[(triton.cdiv(x.numel(), 1024),)](x, y, out, x.numel(), BLOCK=1024)
        torch.cuda.synchronize()
        return out

    before = run()
    dropped = kernel_images.drop_loaded()
    assert dropped["kernels"] >= 1 and dropped["bytes"] > 0, dropped
    assert torch.equal(run(), before)
