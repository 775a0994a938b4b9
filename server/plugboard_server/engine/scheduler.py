"""Admission: which waiting requests join the running batch at the next step. No torch here.

FIFO with three budgets: rows in the batch, KV tokens the batch may grow to (prompt + max_new_tokens
per row, the worst case), and padded tokens in one prefill forward. The queue itself is bounded in
requests (`max_queued_requests`) and in tokens (`max_queued_tokens`, prompt + max_new_tokens each):
past either a new request is refused as overloaded rather than left to grow memory and latency.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from plugboard_server.engine.config import EngineConfig
from plugboard_server.errors import Overloaded


class Schedulable(Protocol):
    @property
    def input_len(self) -> int: ...

    @property
    def budget_tokens(self) -> int: ...

    @property
    def cancelled(self) -> bool: ...


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._waiting: deque[Schedulable] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def queued_tokens(self) -> int:
        return sum(item.budget_tokens for item in self._waiting)

    def enqueue(self, item: Schedulable) -> None:
        """Queue `item`, or raise Overloaded when the queue is full (a request over the token budget
        alone is still taken into an empty queue, as an empty batch takes any request)."""
        cfg = self._config
        if len(self._waiting) >= cfg.max_queued_requests:
            raise Overloaded(f"{len(self._waiting)} requests are already waiting; retry shortly")
        queued = self.queued_tokens
        if self._waiting and queued + item.budget_tokens > cfg.max_queued_tokens:
            raise Overloaded(
                f"the waiting requests already hold {queued} of the {cfg.max_queued_tokens} queued tokens "
                "(prompt + max_new_tokens each); retry shortly"
            )
        self._waiting.append(item)

    def drop_cancelled(self) -> list[Schedulable]:
        dropped = [s for s in self._waiting if s.cancelled]
        if dropped:
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
        return dropped

    def drain(self) -> list[Schedulable]:
        items, self._waiting = list(self._waiting), deque()
        return items

    def admit(
        self, running: Iterable[Schedulable], reserve: Callable[[Schedulable], bool] | None = None
    ) -> list[Schedulable]:
        """Pop the waiting requests that fit beside `running`, in arrival order.

        `reserve(item)` is asked last, for a resource the item needs (its module's slot); an item it
        refuses keeps its place in the queue and the items behind it may go first.
        """
        running = list(running)
        cfg = self._config
        free_rows = cfg.max_batch_size - len(running)
        tokens = sum(r.budget_tokens for r in running)
        admitted: list[Schedulable] = []
        blocked: deque[Schedulable] = deque()
        longest = 0
        while self._waiting and len(admitted) < free_rows:
            item = self._waiting[0]
            alone = not running and not admitted  # the first request always fits an empty batch
            if not alone and tokens + item.budget_tokens > cfg.max_batch_tokens:
                break
            padded = (len(admitted) + 1) * max(longest, item.input_len)
            if admitted and padded > cfg.max_prefill_tokens:
                break
            self._waiting.popleft()
            if reserve is not None and not reserve(item):
                blocked.append(item)
                continue
            admitted.append(item)
            tokens += item.budget_tokens
            longest = max(longest, item.input_len)
        blocked.extend(self._waiting)
        self._waiting = blocked
        return admitted


class FinishRate:
    """When the requests finished lately -> how long a refused request should wait before retrying."""

    def __init__(self, window: int = 64) -> None:
        self._times: deque[float] = deque(maxlen=window)

    def record(self) -> None:
        self._times.append(time.monotonic())

    def retry_after(self, waiting: int) -> float:
        """The time the recent finish rate takes to move a tenth of the `waiting` queue along (at least
        one request), within 50 ms .. 30 s; 1 s before anything finished."""
        if not self._times:
            return 1.0
        rate = len(self._times) / max(time.monotonic() - self._times[0], 1e-3)
        return min(30.0, max(0.05, max(1.0, waiting / 10) / rate))


def plan_prefill(lengths: list[int], waste: int = 64) -> list[list[int]]:
    """Split rows of these input lengths into prefill groups that waste little on padding.

    A padded prefill computes rows x longest tokens. Rows are sorted by length and a new group starts
    when adding a row would pad more than `waste` tokens (or a fifth of the real tokens, if more):
    one more forward costs about as much as that many padded tokens. -> groups of row indices.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        padded = lengths[i] * (len(current) + 1)  # sorted: this row is the longest so far
        if current and padded - (real + lengths[i]) > max(waste, (real + lengths[i]) // 5):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups
