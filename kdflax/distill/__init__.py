"""kdflax.distill."""
