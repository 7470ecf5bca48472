"""The Engram checkpoint `engram-serve` uses when none is named: found in, or created into, a cache.

Layout of the cache folder ($ENGRAM_SERVE_CACHE, default ~/.cache/engram-serve):
  smollm2-trained/   the trained default memory written by `make train-default` (preferred)
  smollm2-default/   an untrained checkpoint (engram-init: N(0,1) tables, zeroed value
                     projection, so outputs equal the backbone's), created on first start
Only the default backbone has a default checkpoint; a checkpoint is tied to its backbone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from engram_runtime.checkpoint import MANIFEST_FILE, init_main

logger = logging.getLogger("engram_serve")

TRAINED_NAME = "smollm2-trained"
INIT_NAME = "smollm2-default"


class DefaultEngramError(Exception):
    pass


def cache_root(override: str | None = None) -> Path:
    root = override or os.environ.get("ENGRAM_SERVE_CACHE") or Path.home() / ".cache" / "engram-serve"
    return Path(root).expanduser()


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def resolve_default_engram(cache_dir: str | None, rows_per_head: int | None, dtype: str = "bfloat16") -> Path:
    """The trained default if present, else the untrained one, created now (with a progress bar)."""
    root = cache_root(cache_dir)
    trained = root / TRAINED_NAME
    if is_checkpoint(trained):
        logger.info("using the trained default Engram checkpoint %s", trained)
        return trained
    target = root / INIT_NAME
    if is_checkpoint(target):
        logger.info("using the default Engram checkpoint %s (untrained; `make train-default` builds a trained "
                    "one at %s)", target, trained)
        return target
    root.mkdir(parents=True, exist_ok=True)
    print(f"engram-serve: creating the default Engram checkpoint in {target} (first start only)", flush=True)
    argv = [str(target), "--dtype", dtype]
    if rows_per_head is not None:
        argv += ["--rows-per-head", str(rows_per_head)]
    if init_main(argv) != 0:
        raise DefaultEngramError(f"could not create the default Engram checkpoint in {target} (see above); "
                                 "pass --engram DIR or --no-engram")
    return target
