"""Fusion heads: classifiers over fused embeddings (or logits), one registered class each.

`base` holds the contract and the registry, `scaling` the per-backbone block treatment,
one module per head family registers its heads (imported here so that they do), and
`artifact` saves, loads and validates a fitted head. A new head is one registered class
in a new module, imported below.
"""

from pipeline.fusion.heads import late, linear, mlp  # noqa: F401  (registers the heads)
from pipeline.fusion.heads.artifact import (
    HEAD_FOLDER,
    SeedRefits,
    check_head_fits,
    chosen_val_scores,
    load_head,
    load_seed_heads,
    save_head,
)
from pipeline.fusion.heads.base import (
    HEADS,
    INPUTS,
    Head,
    by_input,
    list_heads,
    make_head,
    register_head,
    streaming_heads,
)
from pipeline.fusion.heads.scaling import BlockScaler

__all__ = [
    "HEADS",
    "HEAD_FOLDER",
    "INPUTS",
    "BlockScaler",
    "Head",
    "SeedRefits",
    "by_input",
    "check_head_fits",
    "chosen_val_scores",
    "list_heads",
    "load_head",
    "load_seed_heads",
    "make_head",
    "register_head",
    "save_head",
    "streaming_heads",
]
