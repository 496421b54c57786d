"""regionclip_jax.ops."""
