"""The CPU implementation of the device interface: pinning fallback and event semantics."""
import threading
import time

import pytest
import torch

from offload.device import ComputeDevice, DeviceError, PinningUnavailableWarning
from offload.store import TableSet


def test_pinning_without_cuda_warns_and_falls_back(ckpt_factory):
    with pytest.warns(PinningUnavailableWarning, match="no CUDA device; falling back to plain host memory"):
        device = ComputeDevice("cpu", pin_memory=True)
    assert not device.pinned and device.pin_method == "none"
    buf = device.alloc_host((4, 8), torch.bfloat16)
    assert buf.shape == (4, 8) and not buf.is_pinned()
    ckpt = ckpt_factory()
    with pytest.warns(PinningUnavailableWarning):
        tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", pin_memory=True, progress=False)
    assert not tables.device.pinned and torch.equal(tables[1].resident, ckpt.values[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        ComputeDevice("cuda")


def test_cpu_event_blocks_until_recorded_and_copies_are_identity():
    device = ComputeDevice("cpu")
    event = device.event()
    assert not event.wait(timeout=0.01)
    threading.Timer(0.05, event.record).start()
    t0 = time.perf_counter()
    assert event.wait(timeout=5)
    assert time.perf_counter() - t0 >= 0.04 and event.is_set()
    x = torch.ones(3)
    assert device.to_device(x) is x
    with device.side_stream():
        event.host_wait()
