"""HF safetensors I/O and the HF <-> native layout adapter."""

from .safetensors_io import AtomicDirectory, CheckpointError, CheckpointFiles
from .staging import CheckpointWriteError

__all__ = ["AtomicDirectory", "CheckpointError", "CheckpointFiles", "CheckpointWriteError"]
