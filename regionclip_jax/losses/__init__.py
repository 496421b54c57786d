"""regionclip_jax.losses."""
