"""Test configs, a package like `configs/`: `tiny_cache.py` does `from configs import tiny`
(`kdflax.config.load_config` imports it as `configs.tiny_cache` with `tests/` on `sys.path`
while it loads; the two `configs` packages never meet)."""
