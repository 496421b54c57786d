"""The run config: its schema (`schema`), validation (`validation`) and model config (`model`).

`regionclip_jax.main` and the trainers' `run()` validate a config once, before any side effect
(data generation, caption parsing, compilation); see README "Architecture".
"""

from regionclip_jax.config.model import clip_config, rpn_spec, rpn_spec_from_init
from regionclip_jax.config.schema import MODES, base_config
from regionclip_jax.config.validation import ConfigError, validate

__all__ = [
    "MODES",
    "ConfigError",
    "base_config",
    "clip_config",
    "rpn_spec",
    "rpn_spec_from_init",
    "validate",
]
