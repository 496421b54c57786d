"""The run config: its schema (`schema`), validation (`validation`) and model config (`model`).

Every mode's run (`regionclip_jax.train.run.run_task`) validates its config once, before any side
effect (data generation, caption parsing, compilation), and passes on the model config that
`validate` returns; see README "Architecture".
"""

from regionclip_jax.config.model import clip_config, rpn_arch, rpn_arch_from_init
from regionclip_jax.config.schema import MODES, base_config
from regionclip_jax.config.validation import ConfigError, validate

__all__ = [
    "MODES",
    "ConfigError",
    "base_config",
    "clip_config",
    "rpn_arch",
    "rpn_arch_from_init",
    "validate",
]
