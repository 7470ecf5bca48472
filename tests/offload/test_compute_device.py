"""The stand-in of the device interface: pinning fallback, event semantics, staging reuse."""
import threading
import time

import numpy as np
import pytest
import torch

from offload.device import ComputeDevice, DeviceError, PinningUnavailableWarning
from offload.store import TableSet


def test_pinning_without_cuda_warns_and_falls_back(ckpt_factory):
    with pytest.warns(PinningUnavailableWarning, match="no CUDA device; falling back to plain host memory"):
        device = ComputeDevice("cpu", pin_memory=True)
    assert not device.pinned and not device.cuda_primitives
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


class LateCopies(ComputeDevice):
    """The stand-in with device copies that finish 0.1 s after they are issued: every event is
    recorded by a timer, as a CUDA event completes after the copy queued before it."""

    def event(self, timing: bool = False, external: bool = False):
        event = super().event(timing, external)
        record = event.record
        event.record = lambda *args: threading.Timer(0.1, record).start()
        return event


def test_a_staging_buffer_is_reused_only_after_its_copy_finished(ckpt_factory):
    """Host tables copied through a ring of two staging buffers: the second gather takes the other
    buffer at once, the third waits for the first's copy to finish before overwriting its buffer."""
    ckpt = ckpt_factory(dtype="bfloat16")
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", cache_rows=8, device=LateCopies("cpu"),
                           progress=False)
    table, rows = tables[1], np.array([3, 1, 4, 1, 5])
    t0 = time.perf_counter()
    first = table.gather(rows)
    second = table.gather(rows + 1)
    t_second = time.perf_counter() - t0
    third = table.gather(rows + 2)
    t_third = time.perf_counter() - t0
    assert t_second < 0.05 <= 0.09 <= t_third
    for got, offset in ((first, 0), (second, 1), (third, 2)):
        assert torch.equal(got, ckpt.values[1].bfloat16()[rows + offset].float())
