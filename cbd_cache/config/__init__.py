"""Pipeline configs: dataclasses loaded from the TOML recipes in `pipelines/`, plus `--set` overrides.

A pipeline is one whole experiment. `schema` names every field once, `load` reads a file and its
overrides, `checks` validates the values. Loading one imports no torch.
"""
from cbd_cache.config.load import load_config
from cbd_cache.config.schema import (
                                     ALLOCATIONS,
                                     CHOICES,
                                     CHOSEN_ON_VAL,
                                     DEFAULT_PIPELINE,
                                     DISTILL,
                                     DTYPES,
                                     FEW_SHOT_BELOW,
                                     FORMATS,
                                     MANY_SHOT_ABOVE,
                                     NAME_RE,
                                     PROFILES,
                                     REBALANCE,
                                     SAMPLINGS,
                                     SECTIONS,
                                     TABLES,
                                     Config,
                                     DataCfg,
                                     EvalCfg,
                                     ExportCfg,
                                     PipelineCfg,
                                     StudentCfg,
                                     TeacherCfg,
                                     TrainCfg,
                                     ViewsCfg,
)
from cbd_cache.errors import ConfigError

__all__ = ["ALLOCATIONS", "CHOICES", "CHOSEN_ON_VAL", "DEFAULT_PIPELINE", "DISTILL", "DTYPES", "FEW_SHOT_BELOW", "FORMATS",
           "MANY_SHOT_ABOVE", "NAME_RE", "PROFILES", "REBALANCE", "SAMPLINGS", "SECTIONS", "TABLES",
           "Config", "ConfigError", "DataCfg", "EvalCfg", "ExportCfg", "PipelineCfg", "StudentCfg", "TeacherCfg", "TrainCfg", "ViewsCfg",
           "load_config"]
