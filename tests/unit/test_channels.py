"""Channel numbering: upstream numbers are unique, lowest free first, bounded."""

from __future__ import annotations

from amqproxy_mp.proxy.channel_numbers import ChannelNumbers


def test_allocates_lowest_free_and_respects_channel_max() -> None:
    numbers = ChannelNumbers(3)
    assert [numbers.allocate() for _ in range(3)] == [1, 2, 3]
    assert numbers.allocate() is None
    assert numbers.available == 0
    numbers.release(2)
    assert numbers.available == 1
    assert numbers.allocate() == 2
    numbers.release(3)
    numbers.release(1)
    assert numbers.allocate() == 1
    assert numbers.allocate() == 3
    assert numbers.in_use == 3


def test_never_hands_out_a_number_twice() -> None:
    numbers = ChannelNumbers(2047)
    taken: set[int] = set()
    for round_ in range(5):
        for _ in range(300):
            n = numbers.allocate()
            assert n is not None and n not in taken and 1 <= n <= 2047
            taken.add(n)
        for n in sorted(taken)[round_::3]:
            numbers.release(n)
            taken.discard(n)
    assert numbers.in_use == len(taken)
