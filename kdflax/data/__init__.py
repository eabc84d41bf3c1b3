"""kdflax.data."""
