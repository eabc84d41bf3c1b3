"""Run configs (`get_config()` returning an ml_collections `ConfigDict`), a package so that
a config imports the one it builds on like the flax examples do:

    # configs/beans_hybrid.py
    from configs import beans_common

`kdflax.config.load_config('configs/beans_hybrid.py')` imports it as `configs.beans_hybrid`
with this folder's parent on `sys.path` while it loads.
"""
