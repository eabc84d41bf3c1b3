"""kdflax.train."""
