"""The differentiable Engram model used by training, evaluation and the gate renderer.

It is the serving model, not a copy: the runtime's `ModelRunner` and `Transformer` (same
blocks, same Engram-before-attention hook, same attention inputs), the engram engineer's `EngramLayer` and `NgramHasher`,
and table rows decoded by offload's dtype code. What differs is only how rows arrive:
serving gets them from the prefetcher; here they are gathered from a table tensor
(in memory while training, memory-mapped from the table file for eval), and while
training the gathered UNIQUE rows are a leaf tensor whose gradient goes to the sparse
row optimizer. The backbone's parameters never require grad, so autograd builds no graph
before the first Engram layer and keeps no weight gradients anywhere in the backbone.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engram_runtime.checkpoint import EngramCheckpoint, load_checkpoint
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.engram import EngramLayer
from engram_runtime.hashing import NgramHasher
from engram_runtime.model import AttentionInputs, Transformer
from engram_runtime.model_runner import ModelRunner, Chunk, parse_dtype
from engram_runtime.weights import load_model
from offload.dtypes import TableDType, table_dtype
from offload.tablefile import map_rows, read_header


@dataclass
class Rows:
    unique: torch.Tensor    # int64 [U] global table rows looked up by the batch
    inverse: torch.Tensor   # int64 [B, T, heads_total] index into `unique`


def load_backbone(model: str | None, dtype: str = "float32") -> tuple[ModelRunner, object]:
    """The runtime's own ModelRunner (unpacked weights so autograd can run through them;
    frozen: requires_grad False everywhere) and the tokenizer, read by the runtime's loader
    (GGUF or HF directory), so training sees exactly the served backbone.

    dtype "bfloat16" is the runtime's bf16 path (bf16 matmuls, float32 residual stream and
    attention): on the CPU bf16 matmuls run faster than float32 ones (docs/performance.md),
    which is what training throughput is made of. Evaluation defaults to float32, the serving default."""
    loaded = load_model(model)
    runner = ModelRunner(loaded.config, loaded.state_dict, parse_dtype(dtype), num_slots=1,
                         max_model_len=loaded.config.max_position_embeddings, pack_weights=False)
    return runner, loaded.tokenizer


class _Memory:
    """The backbone's Engram hook in training: the reference layers over rows gathered up front."""

    def __init__(self, layers: dict[int, EngramLayer], emb: dict[int, torch.Tensor]):
        self.layers, self.emb, self.layer_ids = layers, emb, frozenset(emb)

    def __call__(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.layers[layer_id](hidden.unsqueeze(2), self.emb[layer_id]).squeeze(2)


class EngramLM:
    def __init__(self, runner: ModelRunner, tokenizer, ckpt: EngramCheckpoint,
                 tables: dict[int, torch.Tensor], trainable: bool):
        cfg = ckpt.config
        mc = runner.config
        ckpt.check_backbone(mc.hidden_size, mc.num_hidden_layers, mc.vocab_size)
        self.runner = runner
        self.backbone: Transformer = runner.model
        self.tokenizer = tokenizer
        self.config = cfg
        self.manifest = ckpt.manifest
        self.hasher = NgramHasher(cfg, CompressedTokenizer.from_tokenizer(tokenizer))
        self.head_offsets = {lid: torch.from_numpy(o) for lid, o in ckpt.head_offsets.items()}
        self.engram: dict[int, EngramLayer] = ckpt.build_layers()
        for layer in self.engram.values():
            layer.train(trainable).requires_grad_(trainable)
        self.tables = tables
        self.specs: dict[int, TableDType] = {lid: table_dtype(ckpt.tables_manifest[str(lid)]["dtype"])
                                             for lid in cfg.layer_ids}
        self.eos_id = mc.eos_token_ids[0] if mc.eos_token_ids else cfg.pad_id

    # ---- tokens -------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- rows ---------------------------------------------------------------------------------
    def lookup(self, ids: np.ndarray) -> dict[int, Rows]:
        """Global table rows of every position and head, deduplicated per layer."""
        out = {}
        for lid, within in self.hasher.hash(ids).items():
            rows = torch.from_numpy(within) + self.head_offsets[lid]
            unique, inverse = torch.unique(rows, return_inverse=True)
            out[lid] = Rows(unique, inverse)
        return out

    def gather(self, lid: int, rows: torch.Tensor) -> torch.Tensor:
        """float32 [n, head_dim] values of global rows (decoded from the table's storage dtype)."""
        return self.specs[lid].decode(self.tables[lid][rows], torch.float32)

    def embeddings(self, ids: np.ndarray, rows: dict[int, Rows] | None = None) -> dict[int, torch.Tensor]:
        """{layer_id: [B, T, heads_total, head_dim]} rows of the batch (`rows`: its lookup, if made)."""
        return {lid: self.gather(lid, r.unique)[r.inverse] for lid, r in (rows or self.lookup(ids)).items()}

    # ---- forward ------------------------------------------------------------------------------
    def _inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, AttentionInputs]:
        """A whole-sequence causal prefill of the b rows in fresh cache slots 0..b-1, with the
        runner's own positions, rope and mask. The cache is re-made for every forward: its
        tensors take part in autograd (K/V are written into them), so reusing them would
        chain one step's graph to the next."""
        b, t = ids.shape
        self.backbone.setup_cache(b, t + 1)
        input_ids, attn, _ = self.runner.attention_inputs([Chunk(i, row, 0) for i, row in enumerate(ids.tolist())])
        return input_ids, attn

    def logits(self, ids: torch.Tensor, emb: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """[B, T, vocab] in the backbone's dtype; emb=None runs the backbone alone (the Engram
        layers skipped)."""
        b, t = ids.shape
        input_ids, attn = self._inputs(ids)
        memory = _Memory(self.engram, emb) if emb is not None else None
        return self.backbone(input_ids, attn, engram=memory).view(b, t, -1)

    def loss(self, ids: torch.Tensor, emb: dict[int, torch.Tensor] | None, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy (nats; the batch's mean, or per position with reduction "none"),
        in float32 whatever the backbone's dtype: a bfloat16 mean steps by 0.008 near 2.4 nats, a
        third of a percent of the gains the held-out evaluations compare."""
        logits = self.logits(ids, emb).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction=reduction)

    @torch.no_grad()
    def token_nll(self, windows: np.ndarray, use_engram: bool, batch_size: int) -> np.ndarray:
        """Next-token cross-entropy (nats, float32) of every position [n, T-1] of fixed windows
        [n, T], scored in batches: per token, so a report can break it down by file or project."""
        out = []
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size]
            nll = self.loss(torch.from_numpy(ids), self.embeddings(ids) if use_engram else None, reduction="none")
            out.append(nll.view(ids.shape[0], -1).numpy())
        return np.concatenate(out)

    def mean_nll(self, windows: np.ndarray, use_engram: bool, batch_size: int) -> float:
        """Mean next-token cross-entropy over fixed windows [n, T]."""
        return float(self.token_nll(windows, use_engram, batch_size).mean(dtype=np.float64))

    @torch.no_grad()
    def gates(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """{layer_id: gate [B, T]} (mean over hyper-connection branches) of a forward with Engram."""
        self.logits(torch.from_numpy(ids), self.embeddings(ids))
        return {lid: layer.last_gate.mean(dim=-1).numpy() for lid, layer in self.engram.items()}

    def dense_state(self) -> dict[int, dict[str, torch.Tensor]]:
        return {lid: layer.state_dict() for lid, layer in self.engram.items()}


def load_engram_lm(model: str | None, loaded, dtype: str = "float32") -> EngramLM:
    """For training: tables already loaded in memory (`ckpt_store.load_for_training`)."""
    runner, tokenizer = load_backbone(model, dtype)
    return EngramLM(runner, tokenizer, loaded.ckpt, loaded.tables, trainable=True)


def open_engram_lm(model: str | None, ckpt_dir: Path, dtype: str = "float32") -> EngramLM:
    """For eval and gates: tables memory-mapped read-only from their files (any table dtype,
    any size), exactly the bytes the server serves."""
    ckpt = load_checkpoint(ckpt_dir)
    tables = {}
    for lid in ckpt.config.layer_ids:
        header = read_header(ckpt_dir / ckpt.tables_manifest[str(lid)]["file"])
        with warnings.catch_warnings():     # read-only map: this code only ever indexes it
            warnings.simplefilter("ignore", UserWarning)
            tables[lid] = torch.from_numpy(map_rows(header)).view(header.dtype.torch_raw)
    runner, tokenizer = load_backbone(model, dtype)
    return EngramLM(runner, tokenizer, ckpt, tables, trainable=False)
