"""kdflax.convert."""
