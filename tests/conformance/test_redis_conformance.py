"""The store conformance suite on a standalone Redis and on a three-node Redis Cluster, both
started by ``scripts/services.sh``. A server that is not running fails these tests."""

from __future__ import annotations

import pytest

from oncely.stores.redis import RedisStore
from oncely.testing.stores import StoreConformance, StoreFactory, StoreFeatures
from tests.stores._redis_support import CLUSTER_URL, REDIS_URL, with_options


class TestRedisStore(StoreConformance):
    features = StoreFeatures(multiprocess=True)

    @pytest.fixture
    def store_factory(self, unique: str) -> StoreFactory:
        url = with_options(REDIS_URL, prefix=f"{unique}:")
        return lambda: RedisStore.from_url(url)


class TestRedisClusterStore(StoreConformance):
    features = StoreFeatures(multiprocess=True)

    @pytest.fixture
    def store_factory(self, unique: str) -> StoreFactory:
        url = with_options(CLUSTER_URL, prefix=f"{unique}:")
        return lambda: RedisStore.from_url(url)
