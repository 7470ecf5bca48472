"""Prefetcher: start gathering a step's rows the moment its token ids are known.

``submit(rows)`` turns within-head row ids into global rows (adding each head's offset), queues a
``Ticket`` and returns at once. One worker thread serves tickets in submission order and layers
in ascending id (the order the forward needs them): for each layer it gathers into the table's
staging buffers, moves the rows to the compute device inside the device's side stream, and
records that layer's event. ``Ticket.wait(layer)`` blocks only if that event is not set yet.

Why rows never leak between steps: every ticket's result is a fresh tensor (dequantisation
writes new memory), the staging buffers are a ring of two per table guarded by events, and the
row ids are copied at submit (or handed over, see submit's global_ids), so neither a later step
nor a caller reusing its arrays can change what an earlier ticket returns, whatever sequences
join or leave the batch.

``transform(layer_id, rows)``, when given, runs on the worker right after a layer's gather and
its result is what ``wait()`` returns: the Engram layer's token-only half (key and value
projections of the rows) is computed there, off the forward's critical path.

Tables in CPU memory without a row cache (EngramTable.native) have a second, native worker
(engram_kernels' RowPrefetcher, csrc/row_prefetch.cpp) for steps of up to
engram_kernels.SMALL_LINEAR_MAX_ROWS tokens, decode steps: it gathers and projects without
the GIL, which the Python worker needs between its calls and can only take from the forward
(measured at batch 1: +0.98 ms per step against +0.67 for no worker at all). ``Projection``
is the transform as data it can apply, given once per layer (``projections``, and again with
``set_projections`` when the weights change). Both workers' tickets answer ``wait()`` the same way.

With ``enabled=False`` nothing runs in the background: ``wait(layer)`` gathers inline, which is
the "--no-prefetch" comparison. Errors raised while gathering (a vanished mmap file, a bad row
id) are kept in the ticket and re-raised by ``wait()`` in the caller's thread as PrefetchError,
chained to the original; the worker itself keeps serving later tickets.
"""
from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import engram_kernels as kernels
from offload.device import Event
from offload.stats import Gather
from offload.store import TableSet

_POLL_SECONDS = 1.0

Transform = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Projection:
    """A transform that is a linear map, as data the native worker can apply: a layer's rows
    [tokens, heads, head_dim] in the tables' compute dtype -> (rows.flatten(1) @ weight.T +
    bias).view(tokens, *shape), float32 (engram_kernels.small_linear's arithmetic).
    weight [O, heads * head_dim] and bias [O], float32 or bfloat16, contiguous."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    shape: tuple[int, ...]


class PrefetchError(RuntimeError):
    """Gathering one layer's rows failed; the message names the layer and the original error."""


class Ticket:
    """One step's rows in flight: ``wait(layer_id) -> [num_tokens, heads_total, head_dim]``
    (or what the prefetcher's transform made of them)."""

    def __init__(self, prefetcher: "Prefetcher", rows: dict[int, np.ndarray]):
        self._prefetcher = prefetcher
        self._rows = rows

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self._rows)

    def wait(self, layer_id: int) -> torch.Tensor:
        """This step's rows for one layer, on the compute device; blocks only if not ready yet."""
        if layer_id not in self._rows:
            raise KeyError(f"this ticket has no rows for layer {layer_id}; it holds layers {self.layer_ids}")
        tables = self._prefetcher.tables
        t0 = time.perf_counter()
        try:
            result = self._result(layer_id)
        except BaseException as exc:
            raise _failed(layer_id, exc)
        finally:
            self._waited(layer_id, time.perf_counter() - t0)
        tables.device.hand_over(result)
        return result

    def _result(self, layer_id: int) -> torch.Tensor:
        """The layer's result once ready, or the exception its gather raised."""
        raise NotImplementedError

    def _waited(self, layer_id: int, seconds: float) -> None:
        self._prefetcher.tables.stats.record_wait(layer_id, seconds)


class WorkerTicket(Ticket):
    """Served by the Python worker (or inline when prefetch is off): per layer an event the
    worker records once the result (or its error) is in."""

    def __init__(self, prefetcher: "Prefetcher", rows: dict[int, np.ndarray]):
        super().__init__(prefetcher, rows)
        self._events: dict[int, Event] = {layer: prefetcher.tables.device.event() for layer in rows}
        self._results: dict[int, torch.Tensor] = {}
        self._errors: dict[int, BaseException] = {}

    def _gather(self, layer_id: int) -> None:
        """Run by the worker (or inline when prefetch is off); never raises."""
        rows = self._rows[layer_id]
        try:
            prefetcher = self._prefetcher
            out = prefetcher.tables[layer_id].gather(rows).view(*rows.shape, -1)
            self._results[layer_id] = out if prefetcher.transform is None else prefetcher.transform(layer_id, out)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by wait()
            self._errors[layer_id] = exc
        finally:
            self._events[layer_id].record()

    def _result(self, layer_id: int) -> torch.Tensor:
        prefetcher = self._prefetcher
        event = self._events[layer_id]
        if not prefetcher.enabled and not event.is_set():
            self._gather(layer_id)
        while not event.wait(_POLL_SECONDS):
            if not prefetcher.worker_alive:
                raise PrefetchError(f"prefetch worker stopped before gathering layer {layer_id}'s rows")
        if layer_id in self._errors:
            raise self._errors[layer_id]
        return self._results[layer_id]


class NativeTicket(Ticket):
    """Served by the native worker (engram_kernels' RowPrefetcher): tables in CPU memory, no cache.
    The statistics of its gathers (timed by the worker) and waits go to TableStats.record_later
    once every layer has been waited for."""

    def __init__(self, prefetcher: "Prefetcher", rows: dict[int, np.ndarray]):
        super().__init__(prefetcher, rows)
        self._jobs = prefetcher.native_layers  # layer id -> its index in the native worker
        self._native = prefetcher.native_worker.submit(
            [torch.from_numpy(np.ascontiguousarray(rows[layer])) for layer in self._jobs])
        self._gather_seconds: dict[int, float] = {}
        self._waits: list[tuple[int, float]] = []

    def _result(self, layer_id: int) -> torch.Tensor:
        result, self._gather_seconds[layer_id] = self._call(self._native.wait, layer_id)
        return result

    def mix(self, layer_id: int, hidden: torch.Tensor, conv_state: torch.Tensor, slots: torch.Tensor,
            *weights) -> tuple[torch.Tensor, torch.Tensor]:
        """EngramLayer.decode_step on this layer's result, the wait included, as one native call:
        hidden [B, 1, D], conv_state and slots as decode_step's, weights EngramLayer.decode_weights()
        -> (out [B, 1, D], gate [B, 1]). The forward of a decode step calls it at each Engram layer:
        wait() then decode_step() were a dozen Python frames around two calls there, each frame
        slow with the caches the backbone's weights have just flushed."""
        try:
            out, gate, self._gather_seconds[layer_id], waited = self._call(
                self._native.mix, layer_id, hidden, conv_state, slots, *weights)
        except BaseException as exc:
            raise _failed(layer_id, exc)
        self._waited(layer_id, waited)
        return out, gate

    def _call(self, fn, layer_id: int, *args):
        """fn (a native ticket method) for the layer's job, a bad row id reported with the table's file."""
        try:
            return fn(self._jobs[layer_id], *args)
        except IndexError as e:
            raise self._prefetcher.tables[layer_id].row_error(e) from None

    def _waited(self, layer_id: int, seconds: float) -> None:
        self._waits.append((layer_id, seconds))
        if len(self._waits) == len(self._jobs):
            tables = self._prefetcher.tables
            tables.stats.record_later(functools.partial(_gathered, tables, self._rows, self._gather_seconds),
                                      self._waits)


def _failed(layer_id: int, exc: BaseException) -> PrefetchError:
    """What Ticket.wait raises for an error of a layer's gather: a PrefetchError naming the layer,
    chained to the original."""
    if isinstance(exc, PrefetchError):
        return exc
    error = PrefetchError(f"gathering rows for layer {layer_id} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _gathered(tables: TableSet, rows: dict[int, np.ndarray], seconds: dict[int, float]) -> list[Gather]:
    """The statistics records of a native ticket's gathers (those that succeeded)."""
    return [tables[layer].gathered(rows[layer], s) for layer, s in seconds.items()]


class Prefetcher:
    """Background gathers of Engram rows, one ticket per engine step."""

    def __init__(self, tables: TableSet, head_offsets: dict[int, np.ndarray], enabled: bool = True,
                 transform: Transform | None = None, projections: dict[int, Projection] | None = None):
        self.tables, self.enabled, self.transform = tables, enabled, transform
        self.head_offsets = {int(k): np.asarray(v, dtype=np.int64) for k, v in head_offsets.items()}
        missing = set(self.head_offsets) - set(tables.layer_ids)
        if missing:
            raise ValueError(f"head_offsets name layers {sorted(missing)} that have no table "
                             f"(tables: {tables.layer_ids})")
        self._head_sizes = {layer: np.diff(np.r_[off, tables[layer].num_rows]) for layer, off in self.head_offsets.items()}
        self._queue: queue.Queue[WorkerTicket | None] = queue.Queue()
        self._closed = False
        self._worker: threading.Thread | None = None
        if enabled:
            self._worker = threading.Thread(target=self._run, name="engram-prefetch", daemon=True)
            self._worker.start()
        self.native_layers = {layer: i for i, layer in enumerate(sorted(self.head_offsets))}  # the forward's order
        self.native_worker = None
        self.set_projections(projections)

    def set_projections(self, projections: dict[int, Projection] | None) -> None:
        """(Re)start the native worker, which takes the steps it can: every table in CPU memory
        without a cache, the transform (if any) also given as `projections` (per layer); steps of
        a few tokens (it projects with small_linear on one thread: prefill chunks go to the Python
        worker's transform). Call it again when the weights behind the transform change."""
        if self.native_worker is not None:
            self.native_worker.close()
            self.native_worker = None
        if (self.enabled and all(self.tables[layer].native for layer in self.native_layers)
                and (self.transform is None or projections is not None)):
            self.native_worker = kernels.native().RowPrefetcher(
                [self._native_job(layer, projections) for layer in self.native_layers])

    def _native_job(self, layer_id: int, projections: dict[int, Projection] | None) -> tuple:
        """What the native worker does with a layer's rows: (table, weight, bias, result shape, dtype)."""
        table = self.tables[layer_id]
        if projections is None:
            return table.resident, None, None, [-1, len(self._head_sizes[layer_id]), table.head_dim], table.compute_dtype
        p = projections[layer_id]
        return table.resident, p.weight, p.bias, [-1, *p.shape], table.compute_dtype

    @property
    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def submit(self, rows: dict[int, np.ndarray], *, global_ids: bool = False) -> Ticket:
        """rows[layer_id]: int64 [num_tokens, heads_total] WITHIN-HEAD ids; returns at once.
        With global_ids they are already rows of the layer's whole table, each head's offset
        added (NgramHasher.hash(..., global_ids=True), the engine's per-step call): they are
        then taken as they are (the caller hands them over: it must not change them later), and
        the gather checks them against the table."""
        if self._closed:
            raise RuntimeError("submit() on a closed Prefetcher")
        global_rows = {}
        for layer_id, ids in rows.items():
            layer_id = int(layer_id)
            if layer_id not in self.head_offsets:
                raise KeyError(f"no table/head offsets for layer {layer_id}; known layers {sorted(self.head_offsets)}")
            if global_ids:
                global_rows[layer_id] = ids
                continue
            ids = np.asarray(ids, dtype=np.int64)
            sizes = self._head_sizes[layer_id]
            if ids.ndim != 2 or ids.shape[1] != len(sizes):
                raise ValueError(f"layer {layer_id}: rows must be [num_tokens, {len(sizes)}] within-head ids, "
                                 f"got shape {tuple(ids.shape)}")
            if ids.size and ((ids < 0) | (ids >= sizes)).any():
                raise ValueError(f"layer {layer_id}: a within-head row id is outside its head's size")
            global_rows[layer_id] = ids + self.head_offsets[layer_id]  # a new array: caller may reuse ids
        tokens = max((len(r) for r in global_rows.values()), default=0)
        if (self.native_worker is not None and tokens <= kernels.SMALL_LINEAR_MAX_ROWS
                and len(global_rows) == len(self.native_layers)):
            return NativeTicket(self, global_rows)
        ticket = WorkerTicket(self, global_rows)
        if self.enabled:
            self._queue.put(ticket)
        return ticket

    def _run(self) -> None:
        ticket: WorkerTicket | None
        while (ticket := self._queue.get()) is not None:
            with self.tables.device.side_stream():
                for layer_id in ticket.layer_ids:
                    ticket._gather(layer_id)

    def close(self) -> None:
        """Finish queued tickets and stop the worker."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
        if self.native_worker is not None:
            self.native_worker.close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
