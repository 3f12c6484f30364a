"""HF safetensors I/O and the HF <-> native layout adapter."""

from .hf_adapter import CheckpointError
from .safetensors_io import AtomicDirectory, CheckpointFiles, write_safetensors

__all__ = ["AtomicDirectory", "CheckpointError", "CheckpointFiles", "write_safetensors"]
