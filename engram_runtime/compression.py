"""CompressedTokenizer: folds tokenizer ids that differ only in case, accents or spacing.

Engram hashes N-grams of *compressed* ids so that "The", " the" and "THE" share
memory rows; the folding must match DeepSeek's reference exactly, otherwise every
hash id (and so every row of a checkpoint trained with the reference layout)
moves. Unicode folding is delegated to the `tokenizers` normalizers, the same
machinery the reference uses, instead of hand-written rules.
"""
from __future__ import annotations

import numpy as np
from tokenizers import Regex, normalizers

# A token that decodes to a lone space must stay a space, but Strip() would empty it:
# mark it with a private-use character first and turn it back after stripping.
_LONE_SPACE = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"


def _key_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _LONE_SPACE),
        normalizers.Strip(),
        normalizers.Replace(_LONE_SPACE, " "),
    ])


class CompressedTokenizer:
    """Maps raw token ids to compressed ids through a lookup table (np.int64 [vocab_size])."""

    def __init__(self, lookup_table: np.ndarray):
        lookup = np.ascontiguousarray(lookup_table, dtype=np.int64)
        if lookup.ndim != 1 or lookup.size == 0:
            raise ValueError(f"CompressedTokenizer: lookup table must be a non-empty 1-D array, got {lookup.shape}")
        self.lookup_table = lookup
        self.num_new_token = int(lookup.max()) + 1

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "CompressedTokenizer":
        """Build the table from a Hugging Face tokenizer (anything with batch_decode / convert_ids_to_tokens).

        Each id is decoded alone. Byte-fallback pieces that are not valid UTF-8 on their
        own decode to U+FFFD; they keep their raw token string as key so that distinct
        bytes stay distinct. Compressed ids are numbered in order of first appearance.
        """
        vocab_size = len(tokenizer)
        ids = list(range(vocab_size))
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        raw_tokens = tokenizer.convert_ids_to_tokens(ids)
        normalizer = _key_normalizer()
        key_to_new: dict[str, int] = {}
        lookup = np.empty(vocab_size, dtype=np.int64)
        for tid, text in enumerate(texts):
            if _REPLACEMENT_CHAR in text:
                key = raw_tokens[tid]
            else:
                key = normalizer.normalize_str(text) or text
            lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
        return cls(lookup)

    @property
    def vocab_size(self) -> int:
        """Number of raw ids the table covers."""
        return int(self.lookup_table.size)

    def __len__(self) -> int:
        return self.num_new_token

    def __call__(self, input_ids) -> np.ndarray:
        """Compress an int array of raw ids of any shape; negative ids (padding markers) pass through."""
        arr = np.asarray(input_ids, dtype=np.int64)
        if arr.size and int(arr.max()) >= self.lookup_table.size:
            raise ValueError(
                f"CompressedTokenizer: token id {int(arr.max())} is outside the vocabulary "
                f"(size {self.lookup_table.size})"
            )
        return np.where(arr >= 0, self.lookup_table[np.maximum(arr, 0)], arr)
