"""kdflax.config: the run config as data, upstream of train, export and pipeline.

    from kdflax.config import base_config, load_config, save_config

    config = load_config('configs/beans_hybrid.py', ['--config.optim.learning_rate=3e-4'])

Modules: `schema` (`base_config()`: every section and its defaults; the data section comes
from `kdflax.data.config`, the loss section from the registered loss terms of
`kdflax.distill`), `load` (config files, `--config.key=value` overrides, `save_config`),
`check` (the schema, type and range checks: one-line `ConfigError`s naming the file and key).
Data, models and distill never import this package: they are handed their section.
"""

from kdflax.config.check import ConfigError, check_config
from kdflax.config.load import CONFIG_HISTORY, RESOLVED_CONFIG, load_config, save_config
from kdflax.config.schema import base_config

__all__ = ['CONFIG_HISTORY', 'RESOLVED_CONFIG', 'ConfigError', 'base_config', 'check_config',
           'load_config', 'save_config']
