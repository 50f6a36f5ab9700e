"""The u-μP paper's Table 5 proxy trained with mup (spec §0.1).

Variants: `--config=configs/mup_proxy.py:cpu` (under 5 minutes on 2 CPU cores),
`:smoke` (seconds, for tests), and `key=value` overrides, comma-separated, e.g.
`:cpu,train.steps=200`.  See umup_jax/config.py for the schema.
"""

from umup_jax.config import proxy_config


def get_config(arg=None):
    return proxy_config("mup", arg)
