"""The u-μP paper's Table 5 proxy trained with umup (spec §0.1).

Variants: `--config=configs/umup_proxy.py:cpu` (under 5 minutes on 2 CPU cores),
`:smoke` (seconds, for tests), `:wikitext103` (the paper's data: WikiText-103, 32k BPE,
prepared once with `python -m umup_jax.prepare_data`, see README), and `key=value` overrides,
comma-separated, e.g. `:cpu,train.steps=200`.  See umup_jax/config.py for the schema.
"""

from umup_jax.config import proxy_config


def get_config(arg=None):
    return proxy_config("umup", arg)
