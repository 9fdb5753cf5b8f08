"""The pass pipeline: which passes run, in which order."""

from __future__ import annotations

# The pipeline, in order. Each name is a file under passes/.
DEFAULT_PASSES = [
    "cleanup", "match_attention", "remove_repeat_kv", "match_rope", "tabulate_rope", "match_rmsnorm",
    "gather_logits", "insert_kv_cache", "fuse_gemms",
]
