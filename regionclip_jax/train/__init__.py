"""regionclip_jax.train."""
