"""EngramConfig: the shape of an Engram memory, field names as in DeepSeek's reference demo.

Keeping the reference's field names (and its defaults) means a config written by
the reference layout reads here unchanged, and the golden vectors' `config` block
maps onto this dataclass one to one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class EngramConfig:
    """Hyper-parameters of the Engram layers of one model.

    engram_vocab_size[n-2] is where the prime search for the heads of N-gram order n
    starts, so each head's table has slightly more rows than that number.
    hc_mult is the number of hyper-connection branches of the backbone (1 for a
    plain residual stream such as Llama).
    """

    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    hc_mult: int = 1

    def __post_init__(self) -> None:
        self.engram_vocab_size = [int(v) for v in self.engram_vocab_size]
        self.layer_ids = [int(i) for i in self.layer_ids]
        self.validate()

    def validate(self) -> None:
        """Reject configs the hasher or layer could only fail on later, with the field named."""
        if self.max_ngram_size < 2:
            raise ValueError(f"EngramConfig.max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                "EngramConfig.engram_vocab_size needs one entry per N-gram order 2.."
                f"{self.max_ngram_size} ({self.max_ngram_size - 1} entries), got {self.engram_vocab_size}"
            )
        if any(v < 2 for v in self.engram_vocab_size):
            raise ValueError(f"EngramConfig.engram_vocab_size entries must be >= 2, got {self.engram_vocab_size}")
        for name in ("n_embed_per_ngram", "n_head_per_ngram", "kernel_size", "hc_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngramConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"EngramConfig.n_embed_per_ngram ({self.n_embed_per_ngram}) must be divisible by "
                f"n_head_per_ngram ({self.n_head_per_ngram})"
            )
        if not self.layer_ids or len(set(self.layer_ids)) != len(self.layer_ids) or min(self.layer_ids) < 0:
            raise ValueError(f"EngramConfig.layer_ids must be distinct non-negative ints, got {self.layer_ids}")

    @property
    def head_dim(self) -> int:
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def heads_total(self) -> int:
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def engram_dim(self) -> int:
        """Width of the concatenated rows of all heads (the projections' input)."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    @property
    def conv_state_len(self) -> int:
        """Positions of left context the dilated short conv needs: (kernel_size - 1) * dilation."""
        return (self.kernel_size - 1) * self.max_ngram_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngramConfig":
        """Build from a dict, refusing unknown keys so a typo in engram.json is not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"EngramConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)
