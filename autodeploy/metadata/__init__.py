"""The per-step metadata contract (docs/contracts.md): host packing (``host``), the one host-to-device copy
(``upload``) and the device-side fields derived once per forward in the one metadata node (``fields``)."""

from autodeploy.metadata.fields import (
    METADATA_FIELDS, MetadataDerivation, derive_fields, prepare_metadata, register_metadata_field, split_field,
)
from autodeploy.metadata.host import (
    DEVICE_COMPOSED, METADATA_OP_INPUTS, STEP_INPUT_NAMES, SequenceChunk, SequencePacker, StepBatch,
    nest_sequences, step_nbytes,
)

__all__ = [
    "DEVICE_COMPOSED", "METADATA_FIELDS", "METADATA_OP_INPUTS", "STEP_INPUT_NAMES", "MetadataDerivation",
    "SequenceChunk", "SequencePacker", "StepBatch", "derive_fields", "nest_sequences", "prepare_metadata",
    "register_metadata_field", "split_field", "step_nbytes",
]
