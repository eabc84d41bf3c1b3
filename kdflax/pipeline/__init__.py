"""kdflax.pipeline: whole runs built from the stages: `run` (teacher -> baseline -> distil ->
export -> results) and `matrix` (every method x seed, mean +- std)."""
