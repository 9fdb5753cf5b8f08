"""Stateful sequence mixers: one file per mixer kind, each with its canonical op (what the model rewrite puts in
the exported graph), its cached op (continues each sequence from its state slot), a plain-torch reference, and its
registration in :data:`MIXER_KINDS` (state shape, state dtype, the probe's token-local stand-in).

The cache-insertion pass for state (passes/insert_state_cache.py) and the mixer check
(passes/check_sequence_mixers.py) work from this registry by name, so a new mixer kind is one file here plus its
model rewrite (autodeploy/models/stateful/)."""

from autodeploy.ops.mixers.base import MIXER_KINDS, MixerKind, cached_mixer_kind, canonical_mixer_kind, register_mixer
from autodeploy.ops.mixers import causal_conv, ssm  # noqa: F401  (registers the kinds)
from autodeploy.ops.mixers import selective_scan  # noqa: F401  (Mamba-1 scan: Jamba)
from autodeploy.ops.mixers import gated_delta  # noqa: F401  (gated delta rule: Qwen3-Next)

__all__ = ["MIXER_KINDS", "MixerKind", "cached_mixer_kind", "canonical_mixer_kind", "register_mixer"]
