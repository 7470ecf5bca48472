"""NativePrefetcher: the Engram backend for small steps over tables in CPU memory, a C++ thread.

A Python worker needs the GIL between its calls and gets it only when the forward on the
engine thread gives it up; at batch 1 those hand-overs stall the forward more than gathering
inline would. engram_kernels' RowPrefetcher (csrc/row_prefetch.cpp) is a native thread that
never touches Python: given each layer's table, fused projection, conv state and mix weights
once (``start``) and the N-gram hash as data (NgramHasher.kernel_args), a step hands over its
token ids alone; the worker hashes them, and per layer gathers, decodes and projects the rows
while the forward computes. At the layer, a decode step's ``NativeTicket.mix`` waits, runs the
gate and short conv (engram_mix) and adds the residual in one call with the GIL released. Its
gathers and waits are counted natively (TableCounters, read by offload's TableStats).

It takes steps of up to engram_kernels.SMALL_LINEAR_MAX_ROWS tokens (it projects on one
thread with small_linear: longer prefill chunks go to the Python Prefetcher), when every table
is in CPU memory without a row cache (EngramTable.native).
"""
from __future__ import annotations

import torch

import engram_kernels as kernels
from engram_runtime.engram_step import ServingWeights, StepTokens, fetch_failed
from engram_runtime.hashing import NgramHasher
from offload.store import TableSet


class NativeTicket:
    """The native worker's ticket for one step; errors come out as PrefetchError naming the
    layer (and, for a row id outside the table, the table's file)."""

    def __init__(self, prefetcher: "NativePrefetcher", native):
        self._prefetcher, self._native = prefetcher, native

    def memory(self, layer_id: int) -> torch.Tensor:
        """The layer's memory [tokens, hc + 1, D]; blocks only if the worker is not there yet."""
        return self._call(self._native.wait, layer_id)

    def mix(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + the layer's output for a decode step, hidden [B, 1, D] -> [B, 1, D]: the wait,
        the gate and short conv at the step's slots, and the residual add in one native call
        (the forward calls it mid-step, where each Python frame and torch op runs cold)."""
        return self._call(self._native.mix, layer_id, hidden)

    def gate_means(self) -> dict[int, list[float]]:
        """Per layer mixed so far, each row's gate averaged over the branches (one native call)."""
        layers = self._prefetcher.layer_ids
        return {layer: means for layer, means in zip(layers, self._native.gate_means()) if means}

    def _call(self, fn, layer_id: int, *args):
        jobs = self._prefetcher.jobs
        if layer_id not in jobs:
            raise KeyError(f"this ticket has no rows for layer {layer_id}; it holds layers {list(jobs)}")
        try:
            return fn(jobs[layer_id], *args)
        except IndexError as e:
            raise fetch_failed(layer_id, self._prefetcher.tables[layer_id].row_error(e)) from e
        except Exception as e:  # noqa: BLE001 - a failed gather, projection or hash, named
            raise fetch_failed(layer_id, e) from e


class NativePrefetcher:
    """The native worker over every Engram layer's table, restarted by ``start`` when the
    layers' weights change."""

    def __init__(self, tables: TableSet, hasher: NgramHasher):
        self.tables, self.hasher = tables, hasher
        self.layer_ids = tables.layer_ids  # the forward's order, which the worker's jobs follow
        self.jobs = {layer: i for i, layer in enumerate(self.layer_ids)}
        self._counters = tables.stats.native_counters(self.layer_ids)
        self._worker = None

    @staticmethod
    def supports(tables: TableSet) -> bool:
        """Whether every table can be gathered natively (CPU memory, no cache, native kernels)."""
        return all(tables[layer].native for layer in tables.layer_ids)

    def start(self, weights: dict[int, ServingWeights], conv_states: dict[int, torch.Tensor]) -> None:
        """(Re)start the worker with each layer's weights and conv state."""
        self.close()
        jobs = []
        for layer in self.layer_ids:
            table, w = self.tables[layer], weights[layer]
            jobs.append(kernels.LayerJob(table.resident, table.compute_dtype, (-1, *w.shape), w.projection.weight,
                                         w.projection.bias, conv_states[layer], w.mix))
        self._worker = kernels.row_prefetcher(jobs, self.hasher.kernel_args(self.layer_ids), self._counters)

    def takes(self, step: StepTokens) -> bool:
        return step.num_tokens <= kernels.SMALL_LINEAR_MAX_ROWS

    def submit(self, step: StepTokens) -> NativeTicket:
        """Hand the step's tokens to the worker; returns at once."""
        if self._worker is None:
            raise RuntimeError("submit() on a NativePrefetcher that is not running")
        return NativeTicket(self, self._worker.submit_tokens(step.contexts, step.new_tokens, step.slots))

    def close(self) -> None:
        """Run what is queued, then stop the worker."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
