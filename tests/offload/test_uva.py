"""offload.uva: the CPU stand-in, the errors without CUDA or cupy, and the CUDA control flow
(register mapped + portable, device pointer, view, unpin once) against a recording fake cupy.
The real registration runs only on a GPU machine (scripts/gpu_check.py)."""
from __future__ import annotations

import gc
import sys
from types import SimpleNamespace

import pytest
import torch

from offload.device import DeviceError
from offload.uva import HOST_REGISTER_MAPPED, HOST_REGISTER_PORTABLE, PinningError, uva_view

DEVICE_OFFSET = 1 << 40  # the fake's device addresses differ from host ones, to see which one is wrapped


class FakeRuntime:
    """cupy.cuda.runtime's calls that uva_view makes, recorded; refuse=True fails hostRegister."""

    class CUDARuntimeError(RuntimeError):
        pass

    def __init__(self, refuse: bool = False):
        self.calls: list[tuple] = []
        self.refuse = refuse

    def hostRegister(self, ptr, nbytes, flags):  # noqa: N802 - cupy's name
        self.calls.append(("register", ptr, nbytes, flags))
        if self.refuse:
            raise self.CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")

    def hostUnregister(self, ptr):  # noqa: N802
        self.calls.append(("unregister", ptr))

    def pointerGetAttributes(self, ptr):  # noqa: N802
        return SimpleNamespace(devicePointer=ptr + DEVICE_OFFSET)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available', cupy replaced by the fake, and torch.as_tensor on the interface giving
    the host bytes it describes (checked against the fake's device address)."""
    runtime = FakeRuntime()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=SimpleNamespace(runtime=runtime)))
    real_as_tensor = torch.as_tensor

    def as_tensor(obj, device=None):
        interface = obj.__cuda_array_interface__
        assert interface["data"] == (obj.owner.data_ptr() + DEVICE_OFFSET, False) and interface["typestr"] == "|u1"
        assert interface["shape"] == (obj.owner.numel() * obj.owner.element_size(),)
        return real_as_tensor(obj.owner).view(torch.uint8).view(-1)

    monkeypatch.setattr(torch, "as_tensor", as_tensor)
    return runtime


def table() -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).view(4, 3).to(torch.bfloat16)


def test_the_cpu_stand_in_is_the_tensor_itself():
    host = table()
    with uva_view(host, "table_layer1.safetensors", "cpu") as view:
        assert view.tensor is host and not view.pinned_here


def test_without_cuda_the_error_names_the_table():
    with pytest.raises(DeviceError, match="table_layer1.safetensors needs CUDA"):
        uva_view(table(), "table_layer1.safetensors", "cuda")


def test_without_cupy_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(DeviceError, match=r"needs cupy: pip install 'engram-serve\[cuda\]'"):
        uva_view(table(), "table_layer1.safetensors", "cuda")


def test_registers_mapped_memory_views_it_and_unpins_once(fake_cuda):
    host = table()
    ptr, nbytes = host.data_ptr(), host.numel() * 2
    view = uva_view(host, "t", "cuda")
    assert fake_cuda.calls == [("register", ptr, nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED)]
    assert view.pinned_here and view.tensor.dtype == torch.bfloat16 and view.tensor.shape == (4, 3)
    assert view.tensor.data_ptr() == ptr  # the stand-in for the device address: no copy was made
    view.close()
    view.close()
    assert fake_cuda.calls[1:] == [("unregister", ptr)]


def test_dropping_the_view_and_the_table_unpins(fake_cuda):
    host = table()
    ptr = host.data_ptr()
    view = uva_view(host, "t", "cuda")
    del view, host
    gc.collect()
    assert fake_cuda.calls[-1] == ("unregister", ptr)


def test_refused_pinning_names_the_table_and_its_size(fake_cuda):
    fake_cuda.refuse = True
    host = torch.empty(3 * 2**20, dtype=torch.uint8)
    with pytest.raises(PinningError, match=r"page-locking table_layer15.safetensors \(3145728 bytes, 0.00 GiB\) "
                                           r"failed: cudaErrorMemoryAllocation.*ulimit -l"):
        uva_view(host, "table_layer15.safetensors", "cuda")
    assert [c[0] for c in fake_cuda.calls] == ["register"]


def test_memory_pinned_before_is_used_as_it_is(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    view = uva_view(table(), "t", "cuda")
    view.close()
    assert fake_cuda.calls == [] and not view.pinned_here


def test_a_failed_view_unpins_what_it_pinned(fake_cuda, monkeypatch):
    def broken(ptr):
        raise fake_cuda.CUDARuntimeError("cudaErrorInvalidValue")

    monkeypatch.setattr(fake_cuda, "pointerGetAttributes", broken)
    host = table()
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        uva_view(host, "t", "cuda")
    assert [c[0] for c in fake_cuda.calls] == ["register", "unregister"]


def test_only_contiguous_cpu_tensors(fake_cuda):
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        uva_view(table().t(), "t", "cuda")
