"""regionclip_jax.text."""
