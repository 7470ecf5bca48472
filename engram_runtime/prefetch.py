"""Prefetcher: the portable Engram backend, a Python worker that fetches a step's rows ahead.

``submit(step)`` hashes the step's tokens into row ids (NgramHasher.step_rows: row ids depend
on token ids alone), queues a ``WorkerTicket`` and returns at once. One worker thread serves
tickets in submission order and layers in ascending id (the order the forward needs them):
for each layer it gathers the rows from the layer's table (offload/: any placement, dtype and
row cache; the copy to the compute device runs on the device's side stream) and computes the
layer's token-only half from them (``project``: the key and value projections), then sets the
layer's event. ``WorkerTicket.memory(layer)`` blocks only if that event is not set yet.

Rows never leak between steps: every result is fresh memory, and the row ids are the ticket's
own, so neither a later step nor the batch's changing membership can change what an earlier
ticket returns. With ``enabled=False`` (or on a device stand-in that runs inline, for traces)
nothing runs in the background: ``memory(layer)``
gathers inline (the ``--no-prefetch`` comparison). An error while fetching (a vanished mmap
file, a bad row id, a failing projection) is kept in the ticket and raised by ``memory()`` in
the caller's thread as a PrefetchError naming the layer; the worker keeps serving later tickets.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np
import torch

from engram_runtime.hashing import NgramHasher
from engram_runtime.engram_step import PrefetchError, StepTokens, fetch_failed
from offload.device import Event
from offload.store import TableSet

_POLL_SECONDS = 1.0

# project(layer_id, rows [tokens, heads, head_dim]) -> the layer's memory [tokens, hc + 1, D]
Project = Callable[[int, torch.Tensor], torch.Tensor]


class WorkerTicket:
    """One step's rows in flight on the Python worker (or fetched inline when prefetch is off):
    per layer an event the worker sets once the layer's memory (or its error) is in."""

    def __init__(self, prefetcher: "Prefetcher", rows: dict[int, np.ndarray]):
        self._prefetcher = prefetcher
        self.layer_ids = sorted(rows)
        self._rows = rows
        self._events: dict[int, Event] = {layer: prefetcher.tables.device.event() for layer in rows}
        self._results: dict[int, torch.Tensor] = {}
        self._errors: dict[int, BaseException] = {}
        self._timed_waits: list[tuple[int, Event, Event]] = []

    def fetch(self, layer_id: int) -> None:
        """Gather and project one layer's rows; run by the worker (or inline); never raises."""
        rows = self._rows[layer_id]
        try:
            prefetcher = self._prefetcher
            gathered = prefetcher.tables[layer_id].gather(rows).view(*rows.shape, -1)
            self._results[layer_id] = prefetcher.project(layer_id, gathered)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by memory()
            self._errors[layer_id] = exc
        finally:
            self._events[layer_id].record()

    def memory(self, layer_id: int) -> torch.Tensor:
        """This step's memory for one layer, on the compute device; blocks only if not ready yet.
        The wait is timed on the host, or on a GPU by events around it on the compute stream
        (the host's block and the stream's wait, as the GPU lived them; read by finish())."""
        if layer_id not in self._events:
            raise KeyError(f"this ticket has no rows for layer {layer_id}; it holds layers {self.layer_ids}")
        device, stats = self._prefetcher.tables.device, self._prefetcher.tables.stats
        before = device.event(timing=True) if device.cuda_primitives else None
        if before is not None:
            before.record()
        t0 = time.perf_counter()
        try:
            result = self._result(layer_id)
        except BaseException as exc:
            raise fetch_failed(layer_id, exc) from exc
        finally:
            if before is None:
                stats.record_wait(layer_id, time.perf_counter() - t0)
            else:
                after = device.event(timing=True)
                after.record()
                self._timed_waits.append((layer_id, before, after))
        device.hand_over(result)
        return result

    def finish(self) -> None:
        """After the step's host sync: the waits timed on the GPU into the table statistics."""
        stats = self._prefetcher.tables.stats
        for layer_id, before, after in self._timed_waits:
            stats.record_wait(layer_id, after.seconds_since(before))
        self._timed_waits.clear()

    def _result(self, layer_id: int) -> torch.Tensor:
        prefetcher = self._prefetcher
        event = self._events[layer_id]
        if prefetcher._worker is None and not event.is_set():
            self.fetch(layer_id)
        while not event.wait(_POLL_SECONDS):
            if not prefetcher.worker_alive:
                raise PrefetchError(f"prefetch worker stopped before gathering layer {layer_id}'s rows")
        if layer_id in self._errors:
            raise self._errors[layer_id]
        return self._results[layer_id]


class Prefetcher:
    """Background fetches of Engram rows by a Python thread, one ticket per engine step."""

    def __init__(self, tables: TableSet, hasher: NgramHasher, project: Project, enabled: bool = True):
        self.tables, self.hasher, self.project, self.enabled = tables, hasher, project, enabled
        self._queue: queue.Queue[WorkerTicket | None] = queue.Queue()
        self._closed = False
        self._worker: threading.Thread | None = None
        if enabled and tables.device.threaded:
            self._worker = threading.Thread(target=self._run, name="engram-prefetch", daemon=True)
            self._worker.start()

    @property
    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def check_health(self) -> str | None:
        """Why this backend cannot serve, or None: a worker that was started and is gone (not
        closed) leaves every later step waiting for rows that never come."""
        if self._worker is not None and not self._closed and not self._worker.is_alive():
            return "the Engram prefetch worker has stopped"
        return None

    def takes(self, step: StepTokens) -> bool:
        """Any step: this is the backend of last resort."""
        return True

    def submit(self, step: StepTokens) -> WorkerTicket:
        """Hash the step's tokens and queue their rows; returns at once."""
        if self._closed:
            raise RuntimeError("submit() on a closed Prefetcher")
        ticket = WorkerTicket(self, self.hasher.step_rows(step.contexts, step.new_tokens))
        if self._worker is not None:
            self._queue.put(ticket)
        return ticket

    def _run(self) -> None:
        ticket: WorkerTicket | None
        with torch.no_grad(), self.tables.device.side_stream():  # a new thread starts with autograd on
            while (ticket := self._queue.get()) is not None:
                for layer_id in ticket.layer_ids:
                    ticket.fetch(layer_id)

    def close(self) -> None:
        """Finish queued tickets and stop the worker."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
