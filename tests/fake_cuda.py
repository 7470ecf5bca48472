"""Tracing the CUDA path on a machine without a GPU: FakeTensorMode on "cuda", plus a census of
every copy to the host.

``FakeTensorMode`` lets tensors live on "cuda" on the CPU-only torch: an op mixing a CPU tensor
into CUDA ones raises ``FakeTensorDeviceMismatchError``, and nothing computes there. Here only
device work is faked (``DeviceFakeMode``): host work (files, tables in host memory, numpy) runs
for real. Two things keep a real serving step from tracing, and ``fake_cuda()`` mends both:

- Some Tensor methods reach a CUDA device guard in torch's Python bindings before the dispatcher
  (``t[i]``, ``t[i] = v``, ``copy_``, ``contiguous``, ``~t``, ``to(device)``, ``torch.tensor(...,
  device=)``), which a CPU-only build
  refuses ("not linked with support for cuda devices"). A TorchFunctionMode sends each to the
  aten operator it binds (``aten.slice``, ``aten.index``, ``aten.copy_``, ...), which is what the
  binding calls on a real GPU, so the trace runs the same operators.
- A host sync (``tolist``, ``item``, ``cpu()``, ``bool(t)``, ...) of a device tensor raises
  ``DataDependentOutputException`` in fake mode, which would end the trace at the first one. The
  census records each such transfer instead (where it happened) and hands back zeros of the
  right shape, so a test can trace a whole engine step and assert how many host transfers it
  made, and from where.
"""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

aten = torch.ops.aten
_TO_HOST = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}  # Tensor methods


@dataclass
class HostTransfer:
    """One copy of device data to the host: the method and the innermost project function calling
    it, as "package/module.py:function"."""

    method: str
    shape: tuple[int, ...]
    where: str


@dataclass
class Census(TorchFunctionMode):
    transfers: list[HostTransfer] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            return _setitem(*args)
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1])
        if func is torch.Tensor.__invert__:
            return aten.bitwise_not.default(args[0])
        if func is torch.Tensor.contiguous:
            x = args[0]
            return x if x.is_contiguous() else aten.clone.default(x, memory_format=torch.contiguous_format)
        if func is torch.Tensor.to:
            return self._to(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") not in (None, "cpu"):
            device = kwargs.pop("device")
            return aten._to_copy.default(func(*args, **kwargs), device=torch.device(device))
        if getattr(func, "__name__", None) in _TO_HOST and args and _on_device(args[0]):
            return self._to_host(func.__name__, args[0])
        return func(*args, **kwargs)

    def _to(self, x: torch.Tensor, *args, **kwargs):
        copy = kwargs.pop("copy", False)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None and not _on_device(x):
            return torch.Tensor.to(x, *args, copy=copy, **kwargs)
        device = device or x.device
        if device == x.device and dtype in (None, x.dtype) and not copy:
            return x
        if _on_device(x) and device.type == "cpu":
            self._record("to('cpu')", x)
        return aten._to_copy.default(x, dtype=dtype or x.dtype, device=device)

    def _to_host(self, method: str, x: torch.Tensor):
        self._record(method, x)
        with unset_fake_temporarily():
            zeros = torch.zeros(x.shape, dtype=x.dtype)  # real memory: what the host would hold
        return zeros if method == "cpu" else getattr(zeros, method)()

    def _record(self, method: str, x: torch.Tensor) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if "/tests/" not in f.filename and "torch" not in f.filename]
        where = "/".join(frames[-1].filename.rsplit("/", 2)[-2:]) + f":{frames[-1].name}" if frames else "?"
        self.transfers.append(HostTransfer(method, tuple(x.shape), where))


def _on_device(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type != "cpu"


def _basic(x: torch.Tensor, index) -> tuple[torch.Tensor, list]:
    """Apply the ints, slices, None and Ellipsis of a Python index; the tensors (advanced indices)
    come back as a list over the result's dims (None where not indexed)."""
    index = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    advanced: dict[int, torch.Tensor] = {}
    dim = 0
    for i in index:
        if i is Ellipsis:
            dim += x.dim() - consumed
        elif i is None:
            x = aten.unsqueeze.default(x, dim)
            dim += 1
        elif isinstance(i, int):
            x = aten.select.int(x, dim, i)
        elif isinstance(i, slice):
            x = aten.slice.Tensor(x, dim, i.start, i.stop, i.step or 1)
            dim += 1
        else:
            advanced[dim] = i if isinstance(i, torch.Tensor) else torch.tensor(i, device=x.device)
            dim += 1
    return x, [advanced.get(d) for d in range(max(advanced) + 1)] if advanced else []


def _getitem(x: torch.Tensor, index):
    x, advanced = _basic(x, index)
    return aten.index.Tensor(x, advanced) if advanced else x


def _setitem(x: torch.Tensor, index, value) -> None:
    view, advanced = _basic(x, index)
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=x.dtype, device=x.device)
    if advanced:
        aten.index_put_.default(view, advanced, value)
    else:
        aten.copy_.default(view, value.expand_as(view))


class DeviceFakeMode(FakeTensorMode):
    """Fake where the device is: an op that touches no fake tensor and makes nothing on a device
    runs for real (file loading, host tables, numpy views, the host's index tensors), so only
    device work is faked, and a real host tensor met by a device op is made fake on the host, where
    the op's device check catches it."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        fake = any(isinstance(t, FakeTensor) for t in leaves)
        on_device = any(isinstance(t, torch.device) and t.type != "cpu" for t in leaves)
        if not fake and not on_device:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def fake_cuda():
    """Device tensors fake, host tensors real, and the census; yields the census."""
    census = Census()
    tolist = FakeTensor.tolist  # FakeTensor's own, which the census would see as item() per element
    FakeTensor.tolist = lambda self: census._to_host("tolist", self) if _on_device(self) else tolist(self)
    try:
        with DeviceFakeMode(), census:
            yield census
    finally:
        FakeTensor.tolist = tolist
