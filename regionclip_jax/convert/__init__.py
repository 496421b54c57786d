"""regionclip_jax.convert."""
