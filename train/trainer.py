"""The Engram retrofit loop: frozen backbone, sparse tables, AdamW on the dense Engram params.

One step: hash the batch's token ids into table rows (token ids only, as at serving time),
gather the unique rows of each table as a leaf tensor, run the differentiable forward, and
hand the leaf's gradient to the sparse row optimizer, which touches those rows only. The
dense Engram parameters (projections, norms, conv) take an AdamW step. The backbone's
weights never require grad, so no gradient (and no optimizer state) ever exists for them.

Everything that decides the loss curve is a function of the step number and the saved
state: the batch (`WindowSchedule`), the learning-rate schedule, the optimizer states and
torch's RNG. `--resume` restores them from the last atomic checkpoint and continues the
same curve.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from train import ckpt_store
from train.batches import WindowSchedule, eval_windows
from train.corpus import discover, explicit_keys
from train.engram_model import EngramLM, load_engram_lm
from train.metrics import MetricsLog, plot_loss_curve
from train.sparse_optim import make_sparse_optimizer
from train.split import CorpusSplit, SplitConfig, heldout_stream, split_corpus, train_stream

# Settings a resumed run must share with the interrupted one, or it would not be the same curve.
RUN_DEFINING = ("corpus", "dtype", "tokens", "seq_len", "batch_size", "seed", "heldout_fraction", "heldout_projects",
                "file_tokens", "dense_lr", "table_lr", "table_optimizer", "warmup_steps", "min_lr_ratio",
                "weight_decay", "table_init_scale", "row_dropout", "eval_tokens")
STATE_FORMAT = "engram-train/2"


@dataclass
class TrainConfig:
    engram: str                               # checkpoint directory, trained in place
    corpus: list[str]
    model: str | None = None                  # GGUF / HF dir; None = default SmolLM2-135M
    dtype: str = "float32"                    # backbone compute while training: float32 | bfloat16
    tokens: int = 1_000_000                   # training tokens (steps = tokens / (batch * seq_len))
    seq_len: int = 256
    batch_size: int = 8
    dense_lr: float = 1e-3                    # AdamW, projections / norms / conv
    table_lr: float = 0.05                    # sparse optimizer, table rows
    table_optimizer: str = "adagrad"          # "adagrad" (row-wise) or "adam" (lazy, 2x table state)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1                 # cosine decay of both lrs down to this fraction
    weight_decay: float = 0.0
    table_init_scale: float = 0.01            # an untrained checkpoint's N(0, 1) rows start scaled by this
    row_dropout: float = 0.0                  # share of looked-up (position, head) rows zeroed in a training step
    heldout_fraction: float = 0.05            # share of the trained projects' files held out (in-domain)
    heldout_projects: float = 0.0             # share of projects held out whole (cross-project); see train.split
    file_tokens: int = 0                      # tokens read from each train file (0: whole files)
    eval_every: int = 50                      # steps between held-out evaluations
    eval_tokens: int = 16_384                 # held-out tokens scored per held-out set at each evaluation
    ckpt_every: int = 100                     # steps between atomic checkpoints
    seed: int = 0
    resume: bool = False
    progress: bool = True

    @property
    def split_config(self) -> SplitConfig:
        return SplitConfig(heldout_fraction=self.heldout_fraction, heldout_projects=self.heldout_projects)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Data:
    schedule: WindowSchedule
    heldout: dict[str, np.ndarray]  # held-out set name -> [n, seq_len] fixed evaluation windows
    split: CorpusSplit
    fingerprint: str                # of the train files: a resume refuses a changed corpus
    stats: dict = field(default_factory=dict)


def prepare_data(cfg: TrainConfig, split: CorpusSplit, encode, eos_id: int) -> Data:
    """Tokenize just enough train text for the run (projects in rounds, train.split), and the
    evaluation windows of each held-out set, so a big default corpus costs no full pass."""
    explicit = explicit_keys(cfg.corpus)
    stream = train_stream(split, encode, eos_id, explicit, cfg.total_steps * cfg.tokens_per_step + cfg.seq_len,
                          cfg.seed, cfg.file_tokens or None)
    held = {name: heldout_stream(files, encode, eos_id, explicit, split.skipped, cfg.eval_tokens, cfg.seq_len)
            for name, files in split.heldout().items()}
    fingerprint = hashlib.sha256("\n".join(f.key for f in split.train).encode()).hexdigest()[:16]
    stats = {"train_files": len(split.train), "train_projects": len({f.project for f in split.train}),
             "train_files_read": len(stream.files), "train_projects_read": len(stream.projects()),
             "train_stream_tokens": len(stream),
             "heldout_files": {name: len(files) for name, files in split.heldout().items()},
             "duplicates": len(split.duplicates), "near_duplicates": len(split.near_duplicates)}
    return Data(WindowSchedule(stream.tokens, cfg.seq_len, cfg.batch_size, cfg.seed),
                {name: eval_windows(h.tokens, cfg.seq_len, cfg.eval_tokens) for name, h in held.items()},
                split, fingerprint, stats)


class Trainer:
    def __init__(self, cfg: TrainConfig, lm: EngramLM, data: Data, ckpt_dir: Path, manifest: dict):
        self.cfg, self.lm, self.data, self.dir = cfg, lm, data, ckpt_dir
        self.manifest = manifest
        params = [p for layer in lm.engram.values() for p in layer.parameters()]
        self.dense_opt = torch.optim.AdamW(params, lr=cfg.dense_lr, weight_decay=cfg.weight_decay)
        self.table_opts = {lid: make_sparse_optimizer(cfg.table_optimizer, t, cfg.table_lr)
                           for lid, t in lm.tables.items()}
        self.log = MetricsLog(ckpt_dir / "metrics.jsonl")
        self.step = 0
        self.baseline_loss: dict[str, float] = {}

    # ---- one step -------------------------------------------------------------------------
    def train_step(self, ids: np.ndarray) -> float:
        factor = self.cfg.lr_factor(self.step)
        for g in self.dense_opt.param_groups:
            g["lr"] = self.cfg.dense_lr * factor
        rows = self.lm.lookup(ids)
        leaves = {lid: self.lm.gather(lid, r.unique).requires_grad_() for lid, r in rows.items()}
        emb = {lid: self.drop_rows(leaves[lid][r.inverse]) for lid, r in rows.items()}
        self.dense_opt.zero_grad(set_to_none=True)
        loss = self.lm.loss(torch.from_numpy(ids), emb)
        loss.backward()
        self.dense_opt.step()
        for lid, r in rows.items():
            self.table_opts[lid].step(r.unique, leaves[lid].grad, lr=self.cfg.table_lr * factor)
        self.step += 1
        return loss.item()

    def drop_rows(self, emb: torch.Tensor) -> torch.Tensor:
        """Zero a random `row_dropout` share of the [B, T, heads, dim] rows: on unseen text many
        heads hit rows no training step moved, and the dense part should have met that case."""
        if not self.cfg.row_dropout:
            return emb
        return emb * (torch.rand(emb.shape[:-1]) >= self.cfg.row_dropout).unsqueeze(-1)

    @torch.no_grad()
    def heldout_loss(self, name: str, use_engram: bool = True) -> float:
        return self.lm.mean_nll(self.data.heldout[name], use_engram=use_engram, batch_size=self.cfg.batch_size)

    # ---- state ------------------------------------------------------------------------------
    def save(self) -> None:
        tensors = {"dense_opt": self.dense_opt.state_dict(), "torch_rng": torch.get_rng_state(),
                   "tables": {lid: o.state_dict() for lid, o in self.table_opts.items()}}
        state = {"format": STATE_FORMAT, "tensors": tensors, "config": asdict(self.cfg),
                 "corpus_fingerprint": self.data.fingerprint, "baseline_loss": self.baseline_loss}
        self.manifest = ckpt_store.save_checkpoint(self.dir, self.step, self.manifest, self.lm.dense_state(),
                                                   self.lm.tables, state)

    def restore(self, state: dict, tensors: dict) -> None:
        if state["corpus_fingerprint"] != self.data.fingerprint:
            raise ckpt_store.CheckpointError(
                f"{self.dir / ckpt_store.TRAIN_STATE}: the corpus's train files differ from the "
                f"interrupted run's; resume with the same --corpus paths")
        self.dense_opt.load_state_dict(tensors["dense_opt"])
        for lid, opt in self.table_opts.items():
            opt.load_state_dict(tensors["tables"][lid])
        torch.set_rng_state(tensors["torch_rng"])
        self.step = int(state["step"])
        self.baseline_loss = state["baseline_loss"]
        self.log.truncate_after(self.step)

    # ---- loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        if not self.baseline_loss:
            self.baseline_loss = {name: self.heldout_loss(name, use_engram=False) for name in self.data.heldout}
        if self.step == 0:                 # a fresh run: drop records of any earlier run in this dir
            self.log.truncate_after(-1)
            self.evaluate_and_log()
        bar = tqdm(total=cfg.total_steps, initial=self.step, unit="step", disable=not cfg.progress,
                   desc="engram-train")
        t0, start_step, tok_s = time.perf_counter(), self.step, 0.0
        while self.step < cfg.total_steps:
            loss = self.train_step(self.data.schedule.batch(self.step))
            tok_s = (self.step - start_step) * cfg.tokens_per_step / (time.perf_counter() - t0)
            self.log.append({"step": self.step, "tokens": self.step * cfg.tokens_per_step, "kind": "train",
                             "loss": loss, "lr_factor": cfg.lr_factor(self.step - 1), "tokens_per_s": tok_s})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            if self.step % cfg.eval_every == 0 or self.step == cfg.total_steps:
                self.evaluate_and_log()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.total_steps:
                self.save()
        bar.close()
        records = self.log.read()
        plot_loss_curve(records, self.dir / "loss_curve.png")
        last = {r["split"]: r for r in records if r["kind"] == "heldout"}
        return {"steps": self.step, "tokens": self.step * cfg.tokens_per_step, "train_tokens_per_s": tok_s,
                "heldout": {name: {k: r[k] for k in ("loss", "baseline_loss", "rel_gain")} for name, r in last.items()}}

    def evaluate_and_log(self) -> None:
        for name, base in self.baseline_loss.items():
            loss = self.heldout_loss(name)
            self.log.append({"step": self.step, "tokens": self.step * self.cfg.tokens_per_step, "kind": "heldout",
                             "split": name, "loss": loss, "baseline_loss": base, "rel_gain": 1 - loss / base})


def untrained(lm: EngramLM) -> bool:
    """engram-init zeroes the value projections and training moves them at its first step: a
    checkpoint whose projections are all zero still has its initial rows."""
    return all(not layer.value_proj.weight.any() for layer in lm.engram.values())


def train(cfg: TrainConfig, lm: EngramLM | None = None, split: CorpusSplit | None = None) -> dict:
    """Run (or resume) a training; returns a summary dict. The checkpoint in cfg.engram is updated.

    `lm` (built from this checkpoint by `load_engram_lm`) skips loading when the caller already
    has it, e.g. `train.default`, which times a step before it picks the token budget; `split`
    (of cfg.corpus) skips splitting the corpus again, e.g. for the runs of `bench.train`.
    """
    ckpt_dir = Path(cfg.engram)
    files = discover(cfg.corpus) if split is None else None   # corpus errors surface before the model load
    if not ckpt_dir.is_dir():
        raise ckpt_store.CheckpointError(f"Engram checkpoint directory {ckpt_dir} does not exist "
                                         f"(create one with engram-init)")
    state = tensors = None
    if cfg.resume:
        state, tensors = ckpt_store.load_train_state(ckpt_dir)
        if state.get("format") != STATE_FORMAT:
            raise ckpt_store.CheckpointError(
                f"{ckpt_dir / ckpt_store.TRAIN_STATE} was written by another version of engram-train "
                f"({state.get('format')}); start a fresh run")
        saved = state["config"]
        cfg = TrainConfig(**{**asdict(cfg), **{k: saved[k] for k in RUN_DEFINING}})
        ckpt_store.complete_interrupted_commit(ckpt_dir, state)
    ckpt_store.collect_garbage(ckpt_dir)
    split = split or split_corpus(files, cfg.split_config)
    if lm is None:
        lm = load_engram_lm(cfg.model, ckpt_store.load_for_training(ckpt_dir), cfg.dtype)
    if state is None and untrained(lm):
        for table in lm.tables.values():
            table.mul_(cfg.table_init_scale)
    data = prepare_data(cfg, split, lm.encode, lm.eos_id)
    data.split.write(ckpt_dir / "split.json")
    trainer = Trainer(cfg, lm, data, ckpt_dir, lm.manifest)
    if state is not None:
        trainer.restore(state, tensors)
    summary = trainer.run()
    (ckpt_dir / "train_summary.json").write_text(json.dumps({**summary, **data.stats}, indent=1))
    return {**summary, **data.stats}
