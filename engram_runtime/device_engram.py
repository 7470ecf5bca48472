"""DeviceEngram: the Engram backend whose rows the compute device reads itself (CUDA).

For tables in GPU memory (placement device) or page-locked in host DRAM and read through a UVA
view (placement host), a step's whole Engram fetch is device work issued from the engine thread:
on the side stream, before layer 0, the step's token ids are hashed into row ids on the device
(DeviceHasher, each slot's N-gram history kept there), and for every Engram layer its rows are
gathered and decoded by one kernel (engram_kernels.triton_gather, fp8 included) and projected
(the layer's token-only half), then that layer's event is recorded. At the layer the compute
stream waits on the event, a stream wait that never blocks the host. Nothing goes through the
host, so a decode step, Engram included, can be captured as one CUDA graph (cuda_graphs.py).

Statistics come from timing events (the side stream's gather time and the compute stream's stall
at each layer), read after the step's one host sync (``DeviceTicket.finish``), and from a
per-row touched map kept on the device, read at scrape time (TableStats.add_device_bitmap).

On the device stand-in (offload.device) the same control flow runs on CPU tensors, the side
stream being a thread, and traced on "cuda" under FakeTensorMode.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import engram_kernels as kernels
from engram_kernels.triton_gather import gather_rows
from engram_runtime.device_hashing import DeviceHasher
from engram_runtime.engram_step import ServingWeights, StepTokens, fetch_failed
from engram_runtime.hashing import NgramHasher
from offload.stats import Gather
from offload.store import TableSet

_NO_ROWS = np.empty(0, dtype=np.int64)  # the touched rows are counted on the device instead


class DeviceTicket:
    """One step's Engram fetch in flight on the side stream: per layer its memory [tokens, hc + 1,
    D] once `ready` is recorded, and the timing events its statistics are read from."""

    def __init__(self, backend: DeviceEngram, num_tokens: int, in_graph: bool):
        """in_graph: recorded inside a CUDA graph, where a timing event must be external (a record
        node), while `ready`, which the compute stream waits on, stays an internal dependency."""
        self._backend = backend
        self.num_tokens = num_tokens
        layers = backend.layer_ids
        timer = lambda: {lid: backend.device.event(timing=True, external=in_graph) for lid in layers}  # noqa: E731
        self._started, self._gathered, self._before, self._after = timer(), timer(), timer(), timer()
        self._ready = {lid: backend.device.event() for lid in layers}
        self._results: dict[int, torch.Tensor] = {}
        self._errors: dict[int, BaseException] = {}
        self._waited: list[int] = []
        self.pending: Callable[[], None] | None = None  # the fetch, when it runs inline at the first wait
        self.stream = backend.side_cuda if backend.prefetch else None  # where fetch() runs (None: current)

    def fetch(self, slots: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor | None) -> None:
        """The side stream's work: hash, then per layer gather, decode, project, record."""
        backend = self._backend
        try:
            rows = backend.hasher.step(slots, token_ids, lengths)  # [L (config order), tokens, heads]
            for lid, index in zip(backend.layer_ids, backend.order):
                self._started[lid].record(self.stream)
                ids = rows.select(0, index).reshape(-1)
                emb = gather_rows(backend.rows[lid], ids, backend.table_dtypes[lid], backend.compute_dtype)
                backend.touched[lid].index_fill_(0, ids, True)
                self._results[lid] = backend.weights[lid].project(emb.view(self.num_tokens, backend.heads, -1))
                self._gathered[lid].record(self.stream)
                self._ready[lid].record(self.stream)
        except Exception as exc:  # noqa: BLE001 - raised by memory() in the forward's thread
            for lid, event in self._ready.items():
                if not event.is_set():
                    self._errors[lid] = exc
                    event.record(self.stream)

    def memory(self, layer_id: int) -> torch.Tensor:
        """The layer's memory on the compute stream, which waits for the side stream's event."""
        if layer_id not in self._ready:
            raise KeyError(f"this ticket has no rows for layer {layer_id}; it holds layers {list(self._ready)}")
        if self.pending is not None:
            self.pending, fetch = None, self.pending
            fetch()
        self._before[layer_id].record()
        self._ready[layer_id].wait()
        self._after[layer_id].record()
        if layer_id in self._errors:
            raise fetch_failed(layer_id, self._errors[layer_id]) from self._errors[layer_id]
        if layer_id not in self._waited:
            self._waited.append(layer_id)
        result = self._results[layer_id]
        self._backend.device.hand_over(result)
        return result

    def finish(self) -> None:
        """After the step's host sync: each layer's gather time and the compute stream's stall
        there into the table statistics. A ticket a CUDA graph captured is finished after every
        replay, which records its events anew."""
        backend, stats = self._backend, self._backend.tables.stats
        lookups = self.num_tokens * backend.heads
        for lid in self._waited:
            seconds = self._gathered[lid].seconds_since(self._started[lid])
            stats.record_gather(Gather(lid, lookups, 0, _NO_ROWS, lookups, seconds))
            stats.record_wait(lid, self._after[lid].seconds_since(self._before[lid]))


class DeviceEngram:
    """Every Engram layer's table as the compute device reads it, its N-gram hasher on the
    device, and the layers' serving weights; ``submit`` a step, or ``launch`` one inside a graph."""

    def __init__(self, tables: TableSet, hasher: NgramHasher, num_slots: int, compute_dtype: torch.dtype,
                 prefetch: bool = True):
        """prefetch=False runs each step's fetch inline at the first Engram layer, on the compute
        stream (the --no-prefetch comparison)."""
        self.tables, self.device, self.compute_dtype = tables, tables.device, compute_dtype
        self.prefetch = prefetch
        self.side_cuda = self.device.side.cuda_stream
        self.hasher = DeviceHasher(hasher, num_slots, self.device.torch_device)
        self.layer_ids = tables.layer_ids
        self.order = [hasher.cfg.layer_ids.index(lid) for lid in self.layer_ids]
        self.heads = hasher.cfg.heads_total
        self.rows = {lid: tables[lid].device_rows() for lid in self.layer_ids}
        self.table_dtypes = {lid: tables[lid].dtype.name for lid in self.layer_ids}
        self.touched = {lid: torch.zeros(tables[lid].num_rows, dtype=torch.bool, device=self.device.torch_device)
                        for lid in self.layer_ids}
        for lid, touched in self.touched.items():
            tables.stats.add_device_bitmap(lid, touched)
        self.weights: dict[int, ServingWeights] = {}

    @staticmethod
    def supports(tables: TableSet) -> bool:
        """Whether the device runs the GPU's code paths and reads every table itself (no row cache)."""
        return tables.device.portable and all(
            tables[lid].cache is None and tables[lid].device_rows() is not None for lid in tables.layer_ids)

    def start(self, weights: dict[int, ServingWeights]) -> None:
        self.weights = weights

    def takes(self, step: StepTokens) -> bool:
        return True

    def submit(self, step: StepTokens) -> DeviceTicket:
        """A step from the host's view of it: its new tokens and slots copied to the device (new
        sequences' histories reset first), then launch()."""
        dev = self.device.torch_device
        width = max(step.new_tokens)
        new = [ctx[len(ctx) - n:] + [0] * (width - n) for ctx, n in zip(step.contexts, step.new_tokens)]
        token_ids = torch.tensor(new, dtype=torch.long, device=dev)
        slots = torch.tensor(step.slots, dtype=torch.long, device=dev)
        lengths = torch.tensor(step.new_tokens, dtype=torch.long, device=dev) if min(step.new_tokens) < width else None
        if step.fresh:
            self.hasher.reset(torch.tensor(step.fresh, dtype=torch.long, device=dev))
        return self.launch(slots, token_ids, lengths)

    def launch(self, slots: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor | None = None,
               in_graph: bool = False) -> DeviceTicket:
        """Issue the step's fetch on the side stream after the compute stream's work so far (the
        inputs); device tensors only, so a graph capture records it (in_graph)."""
        ticket = DeviceTicket(self, token_ids.numel(), in_graph)
        def fetch() -> None:
            with kernels.disabled():  # the GPU's ops, also where the stand-in runs them on CPU tensors
                ticket.fetch(slots, token_ids, lengths)

        if not self.prefetch:
            ticket.pending = fetch
            return ticket
        side = self.device.side
        side.wait_for_compute()
        side.launch(fetch)
        return ticket

    def forget_touched(self) -> None:
        """Clear the touched-row maps (after graph captures, whose padding rows were no lookups)."""
        for touched in self.touched.values():
            touched.zero_()

    def close(self) -> None:
        self.device.side.synchronize()

