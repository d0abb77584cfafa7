"""Config composition (Hydra) and validation against the structured schema."""

from pbkd_cli.config.compose import CONF_DIR, ConfigError, compose, plan_jobs, to_typed
from pbkd_cli.config.schema import PbkdConfig

__all__ = ["CONF_DIR", "ConfigError", "PbkdConfig", "compose", "plan_jobs", "to_typed"]
