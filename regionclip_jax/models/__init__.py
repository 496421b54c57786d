"""regionclip_jax.models."""
