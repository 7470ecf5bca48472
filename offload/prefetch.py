"""Prefetcher: start gathering a step's rows the moment its token ids are known.

``submit(rows)`` turns within-head row ids into global rows (adding each head's offset), queues a
``Ticket`` and returns at once; ``submit_tokens`` takes a step's token ids instead and hashes
them with the prefetcher's ``hasher`` (row ids depend on token ids alone). One worker thread
serves tickets in submission order and layers in ascending id (the order the forward needs
them): for each layer it gathers into the table's staging buffers, moves the rows to the
compute device inside the device's side stream, and records that layer's event.
``Ticket.wait(layer)`` blocks only if that event is not set yet.

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
``set_projections`` when the weights change); the hasher's arithmetic goes to it the same way
(``NgramHasher.kernel_args``), so a decode step's ``submit_tokens`` is one short native call and
the hash runs on the worker too. Both workers' tickets answer ``wait()`` the same way.

With ``enabled=False`` nothing runs in the background: ``wait(layer)`` gathers inline, which is
the "--no-prefetch" comparison. Errors raised while gathering (a vanished mmap file, a bad row
id) are kept in the ticket and re-raised by ``wait()`` in the caller's thread as PrefetchError,
chained to the original; the worker itself keeps serving later tickets.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

import engram_kernels as kernels
from offload.device import Event
from offload.stats import BUCKETS
from offload.store import TableSet

_POLL_SECONDS = 1.0

Transform = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Projection:
    """A transform that is a linear map, as data the native worker can apply: a layer's rows
    [tokens, heads, head_dim] in the tables' compute dtype -> (rows.flatten(1) @ weight.T +
    bias).view(tokens, *shape), float32 (engram_kernels.small_linear's arithmetic).
    weight [O, heads * head_dim] and bias [O], float32 or bfloat16, contiguous. `mix`, if given,
    is what NativeTicket.mix does with the result: (conv state, *EngramLayer.decode_weights())."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    shape: tuple[int, ...]
    mix: tuple | None = None


class Hasher(Protocol):
    """What submit_tokens needs of the row ids' hash (engram_runtime's NgramHasher)."""

    def step_rows(self, contexts: list[list[int]], new_tokens: list[int]) -> dict[int, np.ndarray]:
        ...

    def kernel_args(self, layer_ids: list[int]) -> tuple:
        ...


class PrefetchError(RuntimeError):
    """Gathering one layer's rows failed; the message names the layer and the original error."""


class Ticket:
    """One step's rows in flight: ``wait(layer_id) -> [num_tokens, heads_total, head_dim]``
    (or what the prefetcher's transform made of them)."""

    def __init__(self, prefetcher: "Prefetcher", layer_ids: list[int]):
        self._prefetcher = prefetcher
        self.layer_ids = layer_ids  # ascending

    def wait(self, layer_id: int) -> torch.Tensor:
        """This step's rows for one layer, on the compute device; blocks only if not ready yet."""
        if layer_id not in self.layer_ids:
            raise self._no_layer(layer_id)
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

    def _no_layer(self, layer_id: int) -> KeyError:
        return KeyError(f"this ticket has no rows for layer {layer_id}; it holds layers {self.layer_ids}")

    def _result(self, layer_id: int) -> torch.Tensor:
        """The layer's result once ready, or the exception its gather raised."""
        raise NotImplementedError

    def _waited(self, layer_id: int, seconds: float) -> None:
        self._prefetcher.tables.stats.record_wait(layer_id, seconds)


class WorkerTicket(Ticket):
    """Served by the Python worker (or inline when prefetch is off): per layer an event the
    worker records once the result (or its error) is in."""

    def __init__(self, prefetcher: "Prefetcher", rows: dict[int, np.ndarray]):
        super().__init__(prefetcher, sorted(rows))
        self._rows = rows
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
    `native` is the worker's ticket for the step; the worker's gathers and the waits go to its
    TableCounters, which TableStats reads."""

    def __init__(self, prefetcher: "Prefetcher", native):
        self._jobs = prefetcher.native_layers  # layer id -> its index in the native worker
        super().__init__(prefetcher, list(self._jobs))
        self._native = native

    def wait(self, layer_id: int) -> torch.Tensor:
        return self._call(self._native.wait, layer_id)

    def mix(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + EngramLayer.decode_step on this layer's result, the wait included, as one
        native call with the conv state and weights the worker was given (Projection.mix) at the
        step's slots (submit_tokens): hidden [B, 1, D] -> [B, 1, D]. The forward of a decode step
        calls it at each Engram layer, where every Python frame and torch op is slow with the
        caches the backbone's weights have just flushed: wait(), decode_step() and the residual
        add were a dozen frames and three calls."""
        return self._call(self._native.mix, layer_id, hidden)

    def gate_means(self) -> dict[int, list[float]]:
        """Per layer mixed so far, each row's gate averaged over the branches (one native call)."""
        return {layer: means for layer, means in zip(self.layer_ids, self._native.gate_means()) if means}

    def _call(self, fn, layer_id: int, *args):
        """fn (a native ticket method) for the layer's job; an error as a PrefetchError naming the
        layer (and, for a bad row id, the table's file)."""
        job = self._jobs.get(layer_id)
        if job is None:
            raise self._no_layer(layer_id)
        try:
            return fn(job, *args)
        except IndexError as e:
            raise _failed(layer_id, self._prefetcher.tables[layer_id].row_error(e))
        except Exception as e:  # noqa: BLE001 - a failed gather, projection or hash, named
            raise _failed(layer_id, e)


def _failed(layer_id: int, exc: BaseException) -> PrefetchError:
    """What Ticket.wait raises for an error of a layer's gather: a PrefetchError naming the layer,
    chained to the original."""
    if isinstance(exc, PrefetchError):
        return exc
    error = PrefetchError(f"gathering rows for layer {layer_id} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class Prefetcher:
    """Background gathers of Engram rows, one ticket per engine step."""

    def __init__(self, tables: TableSet, head_offsets: dict[int, np.ndarray], enabled: bool = True,
                 transform: Transform | None = None, projections: dict[int, Projection] | None = None,
                 hasher: Hasher | None = None):
        self.tables, self.enabled, self.transform, self.hasher = tables, enabled, transform, hasher
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
        self._native_counters = None  # the native workers' statistics, made with the first one
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
            layers = list(self.native_layers)
            if self._native_counters is None:
                num_rows = [self.tables[layer].num_rows for layer in layers]
                self._native_counters = kernels.native().TableCounters(num_rows, list(BUCKETS))
                self.tables.stats.add_native(layers, self._native_counters)
            self.native_worker = kernels.native().RowPrefetcher(
                [self._native_job(layer, projections) for layer in layers],
                None if self.hasher is None else self.hasher.kernel_args(layers), self._native_counters)

    def _native_job(self, layer_id: int, projections: dict[int, Projection] | None) -> tuple:
        """What the native worker does with a layer's rows: (table, weight, bias, result shape, dtype, mix)."""
        table = self.tables[layer_id]
        if projections is None:
            shape = [-1, len(self._head_sizes[layer_id]), table.head_dim]
            return table.resident, None, None, shape, table.compute_dtype, None
        p = projections[layer_id]
        return table.resident, p.weight, p.bias, [-1, *p.shape], table.compute_dtype, p.mix

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
        if self._native_takes(tokens) and len(global_rows) == len(self.native_layers):
            return NativeTicket(self, self.native_worker.submit(
                [torch.from_numpy(np.ascontiguousarray(global_rows[layer])) for layer in self.native_layers]))
        ticket = WorkerTicket(self, global_rows)
        if self.enabled:
            self._queue.put(ticket)
        return ticket

    def submit_tokens(self, contexts: list[list[int]], new_tokens: list[int], slots: Sequence[int] = ()) -> Ticket:
        """A step given as token ids (hasher.step_rows' arguments: each row's new tokens after up
        to N - 1 before them, and how many are new): its rows submitted; returns at once. The
        native worker hashes the steps it takes itself, off the caller's thread; `slots` (the rows'
        conv state rows) are for NativeTicket.mix."""
        if self._closed:
            raise RuntimeError("submit_tokens() on a closed Prefetcher")
        if self.hasher is None:
            raise RuntimeError("submit_tokens() needs a Prefetcher made with a hasher")
        if self._native_takes(len(contexts) * max(new_tokens)):
            return NativeTicket(self, self.native_worker.submit_tokens(contexts, new_tokens, slots))
        return self.submit(self.hasher.step_rows(contexts, new_tokens), global_ids=True)

    def _native_takes(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens goes to the native worker (see set_projections)."""
        return self.native_worker is not None and tokens <= kernels.SMALL_LINEAR_MAX_ROWS

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
