"""The one interface that hides CUDA-only steps: page-locking, side stream, events, async copies.

Everything else in ``offload/`` is written against ``ComputeDevice`` and ``Event`` and runs the
same control flow on both implementations: the prefetch worker gathers into staging buffers,
"copies" them to the device inside ``side_stream()``, records one event per layer, and the
forward ``wait()``s on it. On CPU the copy is the identity, the side stream is a no-op context and
an event is a ``threading.Event`` set by ``record()``; so the CPU tests exercise exactly the
synchronisation the GPU path relies on (who waits for what, and when a buffer may be reused).

Page-locking on CUDA: ``cupy.cuda.runtime.hostRegister`` on the existing buffer when cupy is
importable (no second copy of a tens-of-GB table), else allocate with ``pin_memory=True`` before
filling. Asking for pinning without CUDA emits ``PinningUnavailableWarning`` and falls back to
plain host memory (``ComputeDevice.pinned`` says which one you got); asking for a CUDA device
without CUDA raises ``DeviceError``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import threading
import warnings
import weakref

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor of any dtype (bfloat16 shows as int16 bits)."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


def take_rows(src: torch.Tensor, idx: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """src[idx] along dim 0. On CPU with numpy: single-threaded, so a gather on the prefetch thread
    never fights the model's intra-op thread pool (torch's small parallel ops are 10-100x slower on
    a busy 2-core machine); on CUDA with index_select on the device."""
    if src.device.type != "cpu":
        return torch.index_select(src, 0, torch.from_numpy(idx).to(src.device), out=out)
    if out is None:
        out = torch.empty((len(idx), *src.shape[1:]), dtype=src.dtype)
    np.take(as_numpy(src), idx, axis=0, out=as_numpy(out))
    return out


def put_rows(dst: torch.Tensor, idx: np.ndarray, src: torch.Tensor) -> None:
    """dst[idx] = src along dim 0 (see take_rows for why numpy on CPU)."""
    if dst.device.type != "cpu":
        dst.index_copy_(0, torch.from_numpy(idx).to(dst.device), src)
    else:
        as_numpy(dst)[idx] = as_numpy(src)


class DeviceError(RuntimeError):
    """The requested compute device cannot be used on this machine."""


class PinningUnavailableWarning(RuntimeWarning):
    """Page-locked memory was requested where there is no CUDA; plain memory is used instead."""


class Event:
    """Marks the point up to which one layer's rows are ready.

    ``record()`` is called by the producer (the prefetch worker) after issuing the work;
    ``wait()`` is called by the consumer (the forward): it blocks the host only until the producer
    has recorded, then, on CUDA, makes the consumer's current stream wait for the side stream.
    ``host_wait()`` blocks the host until the recorded work has finished (needed before a pinned
    staging buffer is overwritten).
    """

    def __init__(self, cuda: bool):
        self._recorded = threading.Event()
        self._cuda_event = torch.cuda.Event() if cuda else None

    def record(self) -> None:
        if self._cuda_event is not None:
            self._cuda_event.record(torch.cuda.current_stream())
        self._recorded.set()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._recorded.wait(timeout):
            return False
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)
        return True

    def host_wait(self) -> None:
        self._recorded.wait()
        if self._cuda_event is not None:
            self._cuda_event.synchronize()

    def is_set(self) -> bool:
        return self._recorded.is_set()


class ComputeDevice:
    """Where rows are consumed, plus the host memory and streams used to get them there."""

    def __init__(self, device: str | torch.device = "cpu", pin_memory: bool | None = None):
        self.torch_device = torch.device(device)
        self.is_cuda = self.torch_device.type == "cuda"
        if self.is_cuda and not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} was requested but CUDA is not available "
                              f"(torch {torch.__version__}); use device='cpu'")
        if self.torch_device.type not in ("cpu", "cuda"):
            raise DeviceError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'")
        if pin_memory and not self.is_cuda:
            warnings.warn("page-locked (pinned) host memory was requested but there is no CUDA device; "
                          "falling back to plain host memory", PinningUnavailableWarning, stacklevel=2)
        self.pinned = self.is_cuda if pin_memory is None else bool(pin_memory and self.is_cuda)
        self.pin_method = "none"
        if self.pinned:
            self.pin_method = "cupy" if importlib.util.find_spec("cupy") is not None else "torch"
        self._side_stream = torch.cuda.Stream(self.torch_device) if self.is_cuda else None

    def alloc_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host buffer to be filled in place (a table or a staging buffer); page-locked on CUDA."""
        if not self.pinned:
            return torch.empty(shape, dtype=dtype)
        if self.pin_method == "torch":
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        tensor = torch.empty(shape, dtype=dtype)
        self.register_host(tensor)
        return tensor

    def register_host(self, tensor: torch.Tensor) -> None:
        """Page-lock an existing host buffer in place with cupy (no copy); unregistered when freed."""
        import cupy  # noqa: PLC0415 - optional dependency, only on CUDA machines

        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        cupy.cuda.runtime.hostRegister(ptr, nbytes, 0)
        weakref.finalize(tensor, cupy.cuda.runtime.hostUnregister, ptr)

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Buffer on the compute device."""
        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def side_stream(self) -> contextlib.AbstractContextManager:
        """Context in which the prefetch worker issues its copies (a CUDA side stream; no-op on CPU)."""
        if self._side_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._side_stream)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy host rows to the compute device, asynchronously on CUDA; the same tensor on CPU."""
        if not self.is_cuda:
            return host
        return host.to(self.torch_device, non_blocking=self.pinned)

    def event(self) -> Event:
        return Event(self.is_cuda)

    def hand_over(self, tensor: torch.Tensor) -> None:
        """A tensor made on the side stream is now used on the current stream (keeps the CUDA
        caching allocator from reusing its memory too early); nothing to do on CPU."""
        if self.is_cuda:
            tensor.record_stream(torch.cuda.current_stream())
