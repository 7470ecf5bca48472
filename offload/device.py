"""The one interface that hides CUDA-only primitives: page-locking, side stream, events, graphs.

Everything that overlaps work with the forward is written against ``ComputeDevice``, ``Event``,
``SideStream`` and ``StepGraph``, and runs the same control flow on both implementations:

- **CUDA**: a side ``torch.cuda.Stream``; an ``Event`` is a CUDA event that the compute stream
  waits on without blocking the host; a ``StepGraph`` is a captured ``torch.cuda.CUDAGraph``;
  host buffers are page-locked in place (``cudaHostRegister`` of the existing memory, so a
  tens-of-GB table is never copied and never rounded up by torch's caching host allocator).
- **The stand-in** (CPU, and CUDA tensors traced under FakeTensorMode): the side stream is a
  thread that runs launched work in order (or inline, for tracing), an event is a
  ``threading.Event`` set when the work before it ran, a "graph" replays the recorded function on
  the same static buffers, and copies to the device are the identity. So the tests exercise the
  synchronisation the GPU relies on: who waits for what, and when a buffer may be reused.

Asking for pinning without CUDA warns (``PinningUnavailableWarning``) and falls back to plain
memory; asking for a CUDA device without CUDA raises ``DeviceError``.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
import weakref
from typing import Callable

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x03  # pinned for every context, mapped for UVA reads
_CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the pages are mapped PROT_READ


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor of any dtype (bfloat16 shows as int16 bits)."""
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


def take_rows(src: torch.Tensor, idx: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """src[idx] along dim 0. On CPU with numpy: single-threaded, so a gather on a worker thread
    never fights the model's intra-op thread pool; on CUDA with index_select on the device."""
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


class PinningError(DeviceError):
    """The system refused to page-lock a buffer (the message names it and the size asked for)."""

    @classmethod
    def of(cls, label: str, nbytes: int, error: object) -> PinningError:
        return cls(f"page-locking {label} ({nbytes} bytes, {nbytes / 2**30:.2f} GiB) failed: {error}; raise the "
                   "locked-memory limit (ulimit -l, docker --ulimit memlock=-1) or free RAM, or serve the table "
                   "from mmap")


class PinningUnavailableWarning(RuntimeWarning):
    """Page-locked memory was requested where there is no CUDA; plain memory is used instead."""


class Event:
    """Marks the point up to which some work (one layer's rows) is done.

    ``record()`` is called by the producer after issuing the work; ``wait()`` by the consumer: it
    blocks the host only until the producer has recorded, then, on CUDA, makes the consumer's
    current stream wait (a stream wait, not a host wait). ``host_wait()`` blocks the host until
    the work itself has finished (before a pinned staging buffer is overwritten). With timing,
    ``seconds_since(start)`` is the time between two recorded events, read once both are done.
    """

    def __init__(self, cuda: bool, timing: bool = False, external: bool = False):
        """external: recorded inside a CUDA graph, as a timing event there must be."""
        self._recorded = threading.Event()
        self._cuda_event = torch.cuda.Event(enable_timing=timing, external=external) if cuda else None
        self._host_time: float | None = None

    def record(self, stream: torch.cuda.Stream | None = None) -> None:
        if self._cuda_event is not None:
            self._cuda_event.record(stream or torch.cuda.current_stream())
        self._host_time = time.perf_counter()
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

    def seconds_since(self, start: Event) -> float:
        if self._cuda_event is not None:
            return start._cuda_event.elapsed_time(self._cuda_event) / 1e3
        return self._host_time - start._host_time


class SideStream:
    """Where work that overlaps the forward is issued: ``launch(fn)`` returns at once and runs fn
    after everything launched before it. On CUDA fn runs now, inside the side stream (its kernels
    queue there); the stand-in runs fn on its own thread (``threaded``) or at once (tracing).
    An exception of fn on the thread is kept and raised by the next ``synchronize()``."""

    def __init__(self, device: torch.device, cuda: bool, threaded: bool):
        self._cuda = torch.cuda.Stream(device) if cuda else None
        self._threaded = threaded and not cuda
        self._queue: queue.Queue[Callable[[], None] | None] | None = None  # the thread's, made on first use
        self._errors: list[BaseException] = []

    def _run(self) -> None:
        with torch.no_grad():  # a new thread starts with autograd on
            while (fn := self._queue.get()) is not None:
                try:
                    fn()
                except BaseException as exc:  # noqa: BLE001 - raised by synchronize()
                    self._errors.append(exc)
                finally:
                    self._queue.task_done()

    @property
    def cuda_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream (None on the stand-in), for events recorded from work running on it."""
        return self._cuda

    def wait_for_compute(self) -> None:
        """Work launched from now on starts after what the compute stream was given so far (the
        step's inputs); the stand-in's compute work is done by the time launch is called."""
        if self._cuda is not None:
            self._cuda.wait_stream(torch.cuda.current_stream())

    def launch(self, fn: Callable[[], None]) -> None:
        if self._cuda is not None:
            with torch.cuda.stream(self._cuda):
                fn()
        elif self._threaded:
            if self._queue is None:
                self._queue = queue.Queue()
                self._thread = threading.Thread(target=self._run, name="engram-side-stream", daemon=True)
                self._thread.start()
            self._queue.put(fn)
        else:
            fn()

    def record(self, event: Event) -> None:
        """Record `event` after what was launched so far."""
        self.launch(lambda: event.record(self._cuda))

    def synchronize(self) -> None:
        if self._cuda is not None:
            self._cuda.synchronize()
        elif self._queue is not None:
            self._queue.join()
        if self._errors:
            raise self._errors.pop(0)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None


class StepGraph:
    """One decode step recorded once and replayed on the same static buffers: a CUDA graph, or
    on the stand-in the recorded function called again. ``capture(fn)`` warms fn up (CUDA needs
    its lazy initialisations done before capture) and records it; ``replay()`` reruns it."""

    def __init__(self, cuda: bool, pool=None):
        self._graph = torch.cuda.CUDAGraph() if cuda else None
        self._pool = pool
        self._fn: Callable[[], None] | None = None

    def capture(self, fn: Callable[[], None], warmup: int = 2) -> None:
        if self._graph is None:
            self._fn = fn
            fn()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self._graph, pool=self._pool):
            fn()

    @property
    def pool(self):
        """The capture's memory pool, shared by the graphs of other batch sizes."""
        return self._graph.pool() if self._graph is not None else None

    def replay(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self._fn()


class ComputeDevice:
    """Where the model computes and rows are consumed, plus the host memory, streams, events and
    graphs used to get work there. ``portable``: the device's code paths are the GPU's (torch ops,
    device-side hashing and gathers, graphs), true on CUDA; two stand-ins make them testable
    without a GPU: ``portable_cpu()`` runs them on CPU tensors, ``traced("cuda")`` puts tensors on
    "cuda" for tracing under FakeTensorMode."""

    def __init__(self, device: str | torch.device = "cpu", pin_memory: bool | None = None,
                 stand_in: bool = False, threaded: bool = True, portable: bool = False):
        self.torch_device = torch.device(device)
        self.is_cuda = self.torch_device.type == "cuda"
        self.portable = self.is_cuda or portable
        if self.torch_device.type not in ("cpu", "cuda"):
            raise DeviceError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'")
        if self.is_cuda and not stand_in and not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} was requested but CUDA is not available "
                              f"(torch {torch.__version__}); use device='cpu'")
        self.cuda_primitives = self.is_cuda and not stand_in  # real streams, events, graphs, pinning
        self.threaded = threaded  # False: a stand-in for traces, where every worker's job runs inline
        if pin_memory and not self.cuda_primitives:
            warnings.warn("page-locked (pinned) host memory was requested but there is no CUDA device; "
                          "falling back to plain host memory", PinningUnavailableWarning, stacklevel=2)
        self.pinned = self.cuda_primitives if pin_memory is None else bool(pin_memory and self.cuda_primitives)
        self.side = SideStream(self.torch_device, self.cuda_primitives, threaded)

    @classmethod
    def traced(cls, device: str = "cuda") -> ComputeDevice:
        """Tensors on `device`, stand-in primitives run inline: for FakeTensorMode traces."""
        return cls(device, stand_in=True, threaded=False)

    @classmethod
    def portable_cpu(cls, threaded: bool = True) -> ComputeDevice:
        """The GPU's code paths on CPU tensors, with the stand-in primitives."""
        return cls("cpu", stand_in=True, threaded=threaded, portable=True)

    # ---- memory ----
    def alloc_host(self, shape: tuple[int, ...], dtype: torch.dtype, label: str = "a host buffer") -> torch.Tensor:
        """Host buffer to be filled in place (a table or a staging buffer); page-locked on CUDA."""
        tensor = torch.empty(shape, dtype=dtype)
        if self.pinned:
            self.register_host(tensor, label)
        return tensor

    @staticmethod
    def register_host(tensor: torch.Tensor, label: str, read_only: bool = False) -> None:
        """Page-lock an existing host buffer in place (no copy), mapped into the device's address
        space (UVA), unregistered when the tensor is freed. label names it in errors; read_only:
        the buffer is a read-only mapping (a shared table copy), which CUDA must be told of."""
        cudart, ptr = torch.cuda.cudart(), tensor.data_ptr()
        nbytes = tensor.numel() * tensor.element_size()
        flags = _CUDA_HOST_REGISTER_PORTABLE_MAPPED | (_CUDA_HOST_REGISTER_READ_ONLY if read_only else 0)
        err = cudart.cudaHostRegister(ptr, nbytes, flags)
        if int(err) != 0:
            raise PinningError.of(label, nbytes, err)
        weakref.finalize(tensor, cudart.cudaHostUnregister, ptr)

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Buffer on the compute device."""
        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy host memory to the compute device, asynchronously from pinned memory on CUDA; the
        same tensor on CPU."""
        if not self.is_cuda:
            return host
        return host.to(self.torch_device, non_blocking=self.pinned)

    def host_view(self, host: torch.Tensor, label: str) -> tuple[torch.Tensor, Callable[[], None]]:
        """(a tensor on the compute device over `host`'s memory, its close()): on CUDA a zero-copy
        UVA view of the page-locked buffer (offload/uva.py); on the CPU the tensor itself; on a
        traced device a tensor of its shape there, standing for the view."""
        if self.cuda_primitives:
            from offload.uva import uva_view  # noqa: PLC0415 - uva imports this module

            view = uva_view(host, label, self.torch_device)
            return view.tensor, view.close
        if self.is_cuda:
            return torch.empty(host.shape, dtype=host.dtype, device=self.torch_device), lambda: None
        return host, lambda: None

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the device's memory (CUDA only)."""
        return torch.cuda.mem_get_info(self.torch_device)

    # ---- streams, events, graphs ----
    def event(self, timing: bool = False, external: bool = False) -> Event:
        return Event(self.cuda_primitives, timing, external)

    @contextlib.contextmanager
    def side_stream(self):
        """Context in which a worker thread issues its device copies (the side CUDA stream; a no-op
        on the stand-in, whose worker thread is itself the "stream")."""
        if not self.cuda_primitives:
            yield
            return
        with torch.cuda.stream(self.side.cuda_stream):
            yield

    def hand_over(self, tensor: torch.Tensor) -> None:
        """A tensor made on the side stream is now used on the current stream (keeps the CUDA
        caching allocator from reusing its memory too early); nothing to do on the stand-in."""
        if self.cuda_primitives:
            tensor.record_stream(torch.cuda.current_stream())

    def graph(self, pool=None) -> StepGraph:
        return StepGraph(self.cuda_primitives, pool)

    def synchronize(self) -> None:
        if self.cuda_primitives:
            torch.cuda.synchronize(self.torch_device)
        self.side.synchronize()

    def close(self) -> None:
        self.side.close()
