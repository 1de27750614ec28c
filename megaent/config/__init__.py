"""Configuration: one dataclass schema, OmegaConf YAML + dotted overrides."""
from megaent.config.load import ConfigError, field_docs, load_config, to_yaml
from megaent.config.schema import (
    AlgorithmConfig, Config, DataConfig, LossConfig, ModelConfig, OptimizerConfig, ParallelConfig,
    RewardConfig, RolloutConfig, SlurmConfig, TrainerConfig,
)

__all__ = [
    "AlgorithmConfig", "Config", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "RewardConfig", "RolloutConfig", "SlurmConfig", "TrainerConfig", "field_docs",
    "load_config", "to_yaml",
]
