"""The Engram checkpoint `engram-serve` uses when none is named: found in, or created into, a cache.

Looked up in this order (the first directory holding an engram.json wins):
  $ENGRAM_SERVE_CACHE/smollm2-trained/      a trained default memory placed in the cache
  <repo>/checkpoints/engram-smollm2-stdlib/  what `make train-default` writes (train/default.py)
  $ENGRAM_SERVE_CACHE/smollm2-default/      an untrained checkpoint (engram-init: N(0,1) tables,
                                            zeroed value projection, so outputs equal the
                                            backbone's), created there on first start
$ENGRAM_SERVE_CACHE defaults to ~/.cache/engram-serve. Only the default backbone has a default
checkpoint; a checkpoint is tied to its backbone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engram_runtime.checkpoint_format import MANIFEST_FILE
from engram_runtime.checkpoint_init import INIT_ERRORS, InitOptions, engram_init

logger = logging.getLogger("engram_serve")

TRAINED_NAME = "smollm2-trained"
INIT_NAME = "smollm2-default"
TRAIN_DEFAULT_OUT = Path(__file__).resolve().parent.parent / "checkpoints" / "engram-smollm2-stdlib"


class DefaultEngramError(Exception):
    pass


def cache_root(override: str | None = None) -> Path:
    root = override or os.environ.get("ENGRAM_SERVE_CACHE") or Path.home() / ".cache" / "engram-serve"
    return Path(root).expanduser()


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def resolve_default_engram(cache_dir: str | None, rows_per_head: int | None, dtype: str = "bfloat16") -> Path:
    """A trained default if present, else the untrained one, created now (with a progress bar)."""
    root = cache_root(cache_dir)
    trained = root / TRAINED_NAME
    for candidate in (trained, TRAIN_DEFAULT_OUT):
        if is_checkpoint(candidate):
            logger.info("using the trained default Engram checkpoint %s", candidate)
            return candidate
    target = root / INIT_NAME
    if is_checkpoint(target):
        logger.info("using the default Engram checkpoint %s (untrained; `make train-default` builds a trained "
                    "one at %s)", target, trained)
        return target
    root.mkdir(parents=True, exist_ok=True)
    print(f"engram-serve: creating the default Engram checkpoint in {target} (first start only)", flush=True)
    try:
        engram_init(InitOptions(out=target, rows_per_head=rows_per_head, dtype=dtype))
    except INIT_ERRORS as exc:
        raise DefaultEngramError(f"could not create the default Engram checkpoint in {target}: {exc}; "
                                 "pass --engram DIR or --no-engram") from None
    return target
