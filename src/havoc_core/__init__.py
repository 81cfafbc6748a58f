"""HAVOC: a small, plain decoder-only transformer LM stack in PyTorch."""

from havoc_core.attention import AttentionConfig
from havoc_core.config import PRESETS, HavocConfig, get_preset
from havoc_core.errors import CheckpointError, ConfigError, HavocError
from havoc_core.mlp import MLPConfig
from havoc_core.model import HavocModel

__all__ = ["AttentionConfig", "MLPConfig", "HavocConfig", "HavocModel", "PRESETS", "get_preset",
           "HavocError", "ConfigError", "CheckpointError"]
__version__ = "0.1.0"
