"""regionclip_jax.configs: the experiment configs, one `get_config(arg)` per file (big_vision style).

This directory is installed as the package `regionclip_jax.configs` (pyproject.toml maps it with
`package-dir`), so the files import their shared helpers as `from regionclip_jax.configs import
common` and `regionclip_jax.demo` imports the ShapesWorld configs from any install, editable or
not. `python -m regionclip_jax.main --config=configs/<name>.py[:arg]` loads a file by path as
before. See configs/README.md for the list.
"""
