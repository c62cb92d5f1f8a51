"""Typed configuration: dataclass schema, YAML + overrides loader, validation."""

from megatron_bolt.config.loader import config_hash, dump_yaml, load_config, to_dict
from megatron_bolt.config.schema import (
    BoltConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EMConfig,
    EStepConfig,
    EvalConfig,
    ModelConfig,
    ParallelConfig,
    SamplingConfig,
    TrainConfig,
)

__all__ = [
    "BoltConfig", "CheckpointConfig", "ConfigError", "DataConfig", "EMConfig", "EStepConfig", "EvalConfig",
    "ModelConfig", "ParallelConfig", "SamplingConfig", "TrainConfig", "config_hash", "dump_yaml",
    "load_config", "to_dict",
]
