"""The differentiable Engram model used by training, evaluation and the gate renderer.

It is the serving model, not a copy: the runtime's `Transformer` (same blocks, same
Engram-before-attention hook), the engram engineer's `EngramLayer` and `NgramHasher`,
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
from engram_runtime.model import AttentionInputs, Transformer, rope_tables
from engram_runtime.weights import load_model
from offload.dtypes import TableDType, table_dtype
from offload.tablefile import map_rows, read_header


@dataclass
class Rows:
    unique: torch.Tensor    # int64 [U] global table rows looked up by the batch
    inverse: torch.Tensor   # int64 [B, T, heads_total] index into `unique`


def load_backbone(model: str | None) -> tuple[Transformer, object]:
    """Frozen backbone (float32, eval mode, requires_grad False everywhere) and its tokenizer,
    read by the runtime's loader (GGUF or HF directory), so training sees the served weights."""
    loaded = load_model(model)
    backbone = Transformer(loaded.config)
    backbone.load_hf_state_dict(loaded.state_dict)
    backbone.requires_grad_(False).eval()
    return backbone, loaded.tokenizer


class EngramLM:
    def __init__(self, backbone: Transformer, tokenizer, ckpt: EngramCheckpoint,
                 tables: dict[int, torch.Tensor], trainable: bool):
        cfg = ckpt.config
        mc = backbone.config
        ckpt.check_backbone(mc.hidden_size, mc.num_hidden_layers, mc.vocab_size)
        self.backbone = backbone
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
        backbone.set_engram_layers(cfg.layer_ids)
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

    def embeddings(self, ids: np.ndarray) -> dict[int, torch.Tensor]:
        return {lid: self.gather(lid, r.unique)[r.inverse] for lid, r in self.lookup(ids).items()}

    # ---- forward ------------------------------------------------------------------------------
    def _attention(self, b: int, t: int) -> AttentionInputs:
        """A whole-sequence causal prefill of b sequences in fresh cache slots 0..b-1.

        The cache is re-made for every forward: its tensors take part in autograd (K/V are
        written into them), so reusing them would chain one step's graph to the next.
        """
        mc = self.backbone.config
        self.backbone.setup_cache(b, t, torch.float32)
        cos, sin = rope_tables(mc, t)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return AttentionInputs(
            write_slots=torch.arange(b)[:, None].expand(b, t), write_pos=torch.arange(t)[None].expand(b, t),
            read=(0, b), q_rows=None, kv_len=t, mask=causal[None, None].expand(b, 1, t, t),
            cos=cos[None, :, None, :].expand(b, t, 1, -1), sin=sin[None, :, None, :].expand(b, t, 1, -1))

    def logits(self, ids: torch.Tensor, emb: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """[B, T, vocab] float32; emb=None runs the backbone alone (the Engram layers skipped)."""
        b, t = ids.shape

        def hook(layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
            return self.engram[layer_id](hidden.unsqueeze(2), emb[layer_id]).squeeze(2)

        out = self.backbone(ids, self._attention(b, t), engram=hook if emb is not None else None)
        return out.view(b, t, -1)

    def loss(self, ids: torch.Tensor, emb: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) over the batch."""
        logits = self.logits(ids, emb)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    @torch.no_grad()
    def mean_nll(self, windows: np.ndarray, use_engram: bool, batch_size: int) -> float:
        """Mean next-token cross-entropy over fixed windows [n, T], scored in batches."""
        total, count = 0.0, 0
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size]
            emb = self.embeddings(ids) if use_engram else None
            loss = self.loss(torch.from_numpy(ids), emb)
            n = ids.shape[0] * (ids.shape[1] - 1)
            total, count = total + float(loss) * n, count + n
        return total / count

    @torch.no_grad()
    def gates(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """{layer_id: gate [B, T]} (mean over hyper-connection branches) of a forward with Engram."""
        self.logits(torch.from_numpy(ids), self.embeddings(ids))
        return {lid: layer.last_gate.mean(dim=-1).numpy() for lid, layer in self.engram.items()}

    def dense_state(self) -> dict[int, dict[str, torch.Tensor]]:
        return {lid: layer.state_dict() for lid, layer in self.engram.items()}


def load_engram_lm(model: str | None, loaded) -> EngramLM:
    """For training: tables already loaded in memory (`ckpt_store.load_for_training`)."""
    backbone, tokenizer = load_backbone(model)
    return EngramLM(backbone, tokenizer, loaded.ckpt, loaded.tables, trainable=True)


def open_engram_lm(model: str | None, ckpt_dir: Path) -> EngramLM:
    """For eval and gates: tables memory-mapped read-only from their files (any table dtype,
    any size), exactly the bytes the server serves."""
    ckpt = load_checkpoint(ckpt_dir)
    tables = {}
    for lid in ckpt.config.layer_ids:
        header = read_header(ckpt_dir / ckpt.tables_manifest[str(lid)]["file"])
        with warnings.catch_warnings():     # read-only map: this code only ever indexes it
            warnings.simplefilter("ignore", UserWarning)
            tables[lid] = torch.from_numpy(map_rows(header)).view(header.dtype.torch_raw)
    backbone, tokenizer = load_backbone(model)
    return EngramLM(backbone, tokenizer, ckpt, tables, trainable=False)
