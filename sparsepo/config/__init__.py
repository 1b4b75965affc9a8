"""Typed run configuration: the single source of truth for a run.

    cfg = load_config("recipes/demo_dpo.yaml", overrides=["method.beta=0.05", "train.max_steps=20"])

A YAML file maps onto `RunConfig` section by section; `method:` takes `name` plus the
hyper-parameters of that method's dataclass from the loss table. Unknown keys, wrong types and
incompatible combinations raise `ConfigError` naming the key, the file and the fix.

The package: `sections` (the dataclasses, one per YAML section, with field docstrings), `load` (YAML +
overrides -> RunConfig, typo hints, validation, to_dict), `ds_json` (the DeepSpeed JSON and LR
schedule built from a RunConfig). Import from `sparsepo.config`.
"""

from sparsepo.config.ds_json import DS_CONFIG_DIR, build_deepspeed_config, check_batch_size, load_stage_file, lr_schedule
from sparsepo.config.load import (config_fingerprint, config_from_dict, load_config, parse_override, save_resolved,
                                  to_dict, validate)
from sparsepo.config.sections import (CheckpointConfig, ConfigError, DataConfig, DeepSpeedSection, EvalConfig, LoggingConfig,
                                      MethodConfig, ModelConfig, OptimConfig, ReferenceConfig, RunConfig, SAEConfig,
                                      TopologyConfig, TrainConfig)

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedSection", "EvalConfig", "LoggingConfig", "MethodConfig",
           "ModelConfig", "OptimConfig", "ReferenceConfig", "RunConfig", "SAEConfig", "TopologyConfig", "TrainConfig",
           "DS_CONFIG_DIR", "build_deepspeed_config", "check_batch_size", "load_stage_file", "lr_schedule",
           "config_fingerprint", "config_from_dict", "load_config", "parse_override", "save_resolved", "to_dict",
           "validate"]
