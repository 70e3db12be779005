import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.distributed import Pool  # noqa: E402

_POOLS: dict[int, Pool] = {}


def get_pool(world: int) -> Pool:
    """One pool of ``world`` processes for the whole session (restarted if a task broke it)."""
    pool = _POOLS.get(world)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close()
        pool = _POOLS[world] = Pool(world)
    return pool


@pytest.fixture(scope="session")
def pools():
    yield get_pool
    for p in _POOLS.values():
        p.close()
