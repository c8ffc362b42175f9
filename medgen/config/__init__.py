"""The one typed config: dataclasses that are also the CLI (``section.key=value`` overrides).

- ``schema``: the sections and their fields, each with its default, help and limits;
- ``load``: YAML + overrides -> a checked Config, every problem at once;
- ``doc``: the reference table in the README.
"""
from medgen.config.doc import DOC_END, DOC_START, config_doc, iter_fields, update_doc
from medgen.config.load import build_dataclass, dump_yaml, from_raw, load_config, stage_problems
from medgen.config.schema import (ASSETS, DEMO_ARTICLES, DEMO_PROMPTS, STAGES, Config, DataConfig, EvalConfig,
                                  GenerateConfig, LoraConfig, ModelConfig, RunConfig, SlurmConfig, SweepConfig,
                                  TrainConfig, opt)

__all__ = ["ASSETS", "DEMO_ARTICLES", "DEMO_PROMPTS", "DOC_END", "DOC_START", "STAGES", "Config", "DataConfig",
           "EvalConfig", "GenerateConfig", "LoraConfig", "ModelConfig", "RunConfig", "SlurmConfig", "SweepConfig",
           "TrainConfig", "build_dataclass", "config_doc", "dump_yaml", "from_raw", "iter_fields", "load_config",
           "opt", "stage_problems", "update_doc"]
