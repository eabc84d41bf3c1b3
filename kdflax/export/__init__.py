"""kdflax.export."""
