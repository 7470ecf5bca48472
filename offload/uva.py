"""UVA views: a CUDA tensor over a host table's own memory, read by GPU kernels with zero copies.

A table in host DRAM is page-locked in place (cudaHostRegister with the Mapped and Portable
flags, through cupy: never a second copy, and never torch's caching host allocator, which
rounds a 40 GB table up to 64 GB) and its device address under unified virtual addressing is
wrapped as a CUDA tensor (torch.as_tensor over ``__cuda_array_interface__``), as vLLM does with
``get_cuda_view_from_cpu_tensor``. A gather kernel (engram_kernels.triton_gather) then reads
just the rows a step needs across PCIe, and the view can be used inside a CUDA graph.

On CPU the "view" is the tensor itself, so the same control flow runs in the tests. Without
CUDA, or without cupy, asking for a CUDA view raises DeviceError; a registration that the
system refuses (locked-memory limit, RAM) raises PinningError naming the table and its size.
"""
from __future__ import annotations

import weakref

import torch

from offload.device import DeviceError, PinningError

HOST_REGISTER_PORTABLE = 0x01  # cudaHostRegisterPortable: pinned for every CUDA context
HOST_REGISTER_MAPPED = 0x02  # cudaHostRegisterMapped: mapped into the device address space


class UvaView:
    """A host tensor and the device tensor that views it; close() unpins what uva_view pinned.

    The view keeps the host tensor alive (torch holds the interface object, which holds it), and
    the pinning is undone when the view is garbage-collected or at close(), whichever comes
    first. After close() the view must not be read: the memory is no longer page-locked."""

    def __init__(self, host: torch.Tensor, tensor: torch.Tensor, unpin: weakref.finalize | None = None):
        self.host = host
        self.tensor = tensor
        self._unpin = unpin

    @property
    def pinned_here(self) -> bool:
        """Whether uva_view page-locked the memory itself (and so unpins it), not the caller."""
        return self._unpin is not None

    def close(self) -> None:
        """Unpin (once) what uva_view pinned; a no-op for the CPU stand-in or memory pinned before."""
        if self._unpin is not None:
            self._unpin()

    def __enter__(self) -> UvaView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _DeviceBytes:
    """``__cuda_array_interface__`` of nbytes bytes at a device address, holding the host tensor."""

    def __init__(self, device_ptr: int, nbytes: int, owner: torch.Tensor):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (device_ptr, False),
                                         "strides": None, "version": 3}


def uva_view(host: torch.Tensor, label: str, device: str | torch.device = "cuda") -> UvaView:
    """A view of `host` (a contiguous CPU tensor) on `device`: the tensor itself on CPU, a
    zero-copy CUDA tensor over its page-locked memory on CUDA. Memory already pinned (a
    torch pinned tensor, ComputeDevice.register_host) is used as it is. label names the table
    (e.g. its file) in errors."""
    device = torch.device(device)
    if device.type == "cpu":
        return UvaView(host, host)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise DeviceError(f"a UVA view of {label} needs CUDA, but device {str(device)!r} is not available "
                          f"(torch {torch.__version__})")
    if host.device.type != "cpu" or not host.is_contiguous():
        raise ValueError(f"a UVA view of {label} needs a contiguous CPU tensor, got one on {host.device}")
    try:
        import cupy  # noqa: PLC0415 - optional dependency, only on CUDA machines
    except ImportError as e:
        raise DeviceError(f"a UVA view of {label} needs cupy: pip install 'engram-serve[cuda]'") from e
    runtime, ptr, nbytes = cupy.cuda.runtime, host.data_ptr(), host.numel() * host.element_size()
    unpin = None
    if not host.is_pinned():
        try:
            runtime.hostRegister(ptr, nbytes, HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED)
        except runtime.CUDARuntimeError as e:
            raise PinningError.of(label, nbytes, e) from e
        unpin = weakref.finalize(host, runtime.hostUnregister, ptr)
    try:
        device_ptr = runtime.pointerGetAttributes(ptr).devicePointer
        interface = _DeviceBytes(device_ptr, nbytes, host)
        tensor = torch.as_tensor(interface, device=device).view(host.dtype).view(host.shape)
    except Exception:
        if unpin is not None:
            unpin()
        raise
    return UvaView(host, tensor, unpin)
