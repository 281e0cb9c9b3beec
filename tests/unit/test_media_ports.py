"""PortPool bookkeeping (binding is tested with real sockets in tests/integration)."""

from __future__ import annotations

import pytest

from sbc.media.ports import PortPool, PortsExhausted


def test_pairs_are_even_and_within_range() -> None:
    pool = PortPool(10001, 10010)  # odd start rounds up: 10002, 10004, 10006, 10008
    assert pool.capacity == 4
    ports = [pool.allocate() for _ in range(4)]
    assert ports == [10002, 10004, 10006, 10008]
    assert all(p % 2 == 0 and p + 1 <= 10010 for p in ports)
    assert (pool.in_use, pool.available) == (4, 0)


def test_exhaustion_raises_503() -> None:
    pool = PortPool(20000, 20001)
    pool.allocate()
    with pytest.raises(PortsExhausted) as info:
        pool.allocate()
    assert info.value.status == 503


def test_release_reuses_least_recently_released_last() -> None:
    pool = PortPool(30000, 30005)  # 30000, 30002, 30004
    a = pool.allocate()
    pool.release(a)
    assert pool.allocate() == 30002  # a just-released pair is not handed out again at once
    assert pool.allocate() == 30004
    assert pool.allocate() == a
    assert (pool.in_use, pool.available) == (3, 0)


def test_release_of_unallocated_port_is_a_bug() -> None:
    pool = PortPool(30000, 30005)
    with pytest.raises(ValueError):
        pool.release(30000)
    port = pool.allocate()
    pool.release(port)
    with pytest.raises(ValueError):
        pool.release(port)


@pytest.mark.parametrize(("low", "high"), [(10000, 10000), (10001, 10002), (0, 1), (65534, 65536)])
def test_ranges_without_a_pair_are_rejected(low: int, high: int) -> None:
    with pytest.raises(ValueError):
        PortPool(low, high)
