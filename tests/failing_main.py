"""``python -m umup_jax.main`` whose input pipeline fails at its 4th batch, as a shard that
cannot be read would: the two-process tests of tests/test_sharding.py run it in one process
to see the other stop too."""

import runpy
import sys

from umup_jax import data as data_lib

_real_next = data_lib.Prefetcher.next
_calls = [0]


def _failing_next(self):
    _calls[0] += 1
    if _calls[0] == 4:
        raise OSError(5, "Input/output error", "/data/train/shard-00003.bin")
    return _real_next(self)


data_lib.Prefetcher.next = _failing_next
sys.argv[0] = "umup_jax.main"
runpy.run_module("umup_jax.main", run_name="__main__", alter_sys=True)
