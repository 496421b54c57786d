"""regionclip_jax.eval."""
