"""regionclip_jax.data."""
