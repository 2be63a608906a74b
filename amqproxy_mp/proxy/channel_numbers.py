"""Channel numbers of one upstream connection, lowest free first."""

from __future__ import annotations

import heapq


class ChannelNumbers:
    """Allocates channel numbers 1..channel_max, lowest free first."""

    def __init__(self, channel_max: int) -> None:
        self.channel_max = channel_max
        self._next = 1
        self._freed: list[int] = []
        self.in_use = 0

    def allocate(self) -> int | None:
        if self._freed:
            number = heapq.heappop(self._freed)
        elif self._next <= self.channel_max:
            number = self._next
            self._next += 1
        else:
            return None
        self.in_use += 1
        return number

    def release(self, number: int) -> None:
        heapq.heappush(self._freed, number)
        self.in_use -= 1

    @property
    def available(self) -> int:
        return self.channel_max - self.in_use
