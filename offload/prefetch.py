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

With ``enabled=False`` nothing runs in the background: ``wait(layer)`` gathers inline, which is
the "--no-prefetch" comparison. Errors raised while gathering (a vanished mmap file, a bad row
id) are kept in the ticket and re-raised by ``wait()`` in the caller's thread as PrefetchError,
chained to the original; the worker itself keeps serving later tickets.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np
import torch

from offload.device import Event
from offload.store import TableSet

_POLL_SECONDS = 1.0

Transform = Callable[[int, torch.Tensor], torch.Tensor]


class PrefetchError(RuntimeError):
    """Gathering one layer's rows failed; the message names the layer and the original error."""


class Ticket:
    """One step's rows in flight: ``wait(layer_id) -> [num_tokens, heads_total, head_dim]``
    (or what the prefetcher's transform made of them)."""

    def __init__(self, prefetcher: "Prefetcher", rows: dict[int, np.ndarray]):
        self._prefetcher = prefetcher
        self._rows = rows
        self._events: dict[int, Event] = {layer: prefetcher.tables.device.event() for layer in rows}
        self._results: dict[int, torch.Tensor] = {}
        self._errors: dict[int, BaseException] = {}

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self._rows)

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

    def wait(self, layer_id: int) -> torch.Tensor:
        """This step's rows for one layer, on the compute device; blocks only if not ready yet."""
        if layer_id not in self._events:
            raise KeyError(f"this ticket has no rows for layer {layer_id}; it holds layers {self.layer_ids}")
        prefetcher = self._prefetcher
        t0 = time.perf_counter()
        event = self._events[layer_id]
        if not prefetcher.enabled and not event.is_set():
            self._gather(layer_id)
        while not event.wait(_POLL_SECONDS):
            if not prefetcher.worker_alive:
                raise PrefetchError(f"prefetch worker stopped before gathering layer {layer_id}'s rows")
        prefetcher.tables.stats.record_wait(layer_id, time.perf_counter() - t0)
        if layer_id in self._errors:
            exc = self._errors[layer_id]
            raise PrefetchError(f"gathering rows for layer {layer_id} failed: {type(exc).__name__}: {exc}") from exc
        result = self._results[layer_id]
        prefetcher.tables.device.hand_over(result)
        return result


class Prefetcher:
    """Background gathers of Engram rows, one ticket per engine step."""

    def __init__(self, tables: TableSet, head_offsets: dict[int, np.ndarray], enabled: bool = True,
                 transform: Transform | None = None):
        self.tables, self.enabled, self.transform = tables, enabled, transform
        self.head_offsets = {int(k): np.asarray(v, dtype=np.int64) for k, v in head_offsets.items()}
        missing = set(self.head_offsets) - set(tables.layer_ids)
        if missing:
            raise ValueError(f"head_offsets name layers {sorted(missing)} that have no table "
                             f"(tables: {tables.layer_ids})")
        self._head_sizes = {layer: np.diff(np.r_[off, tables[layer].num_rows]) for layer, off in self.head_offsets.items()}
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._closed = False
        self._worker: threading.Thread | None = None
        if enabled:
            self._worker = threading.Thread(target=self._run, name="engram-prefetch", daemon=True)
            self._worker.start()

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
        ticket = Ticket(self, global_rows)
        if self.enabled:
            self._queue.put(ticket)
        return ticket

    def _run(self) -> None:
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

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
