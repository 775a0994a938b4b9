from __future__ import annotations

from dataclasses import dataclass

import pytest

from plugboard_server.engine.config import EngineConfig
from plugboard_server.engine.scheduler import Scheduler
from plugboard_server.errors import Overloaded


@dataclass
class Item:
    input_len: int
    max_new: int = 10
    cancelled: bool = False

    @property
    def budget_tokens(self) -> int:
        return self.input_len + self.max_new


def test_fifo_up_to_free_rows():
    s = Scheduler(EngineConfig(max_batch_size=3))
    items = [Item(5) for _ in range(5)]
    for i in items:
        s.enqueue(i)
    assert s.admit([items[0]]) == items[:2]
    assert len(s) == 3


def test_token_budget_stops_admission_but_an_empty_batch_takes_one():
    s = Scheduler(EngineConfig(max_batch_tokens=30))
    big, small = Item(100), Item(5)
    s.enqueue(big)
    s.enqueue(small)
    assert s.admit([]) == [big]  # alone it always fits
    assert s.admit([big]) == []  # no room beside it: arrival order is kept
    assert s.admit([]) == [small]


def test_prefill_budget_counts_padding():
    s = Scheduler(EngineConfig(max_prefill_tokens=100))
    items = [Item(10), Item(60), Item(10), Item(10)]
    for i in items:
        s.enqueue(i)
    assert s.admit([]) == items[:1]  # 2 rows x 60 padded = 120 > 100
    assert s.admit([]) == items[1:2]
    assert s.admit([]) == items[2:]


def test_queue_is_bounded():
    s = Scheduler(EngineConfig(max_queued_requests=2))
    s.enqueue(Item(1))
    s.enqueue(Item(1))
    with pytest.raises(Overloaded):
        s.enqueue(Item(1))


def test_queue_is_bounded_in_tokens_but_takes_one_big_request_alone():
    s = Scheduler(EngineConfig(max_queued_tokens=50))
    big = Item(100)
    s.enqueue(big)  # over the budget alone: an empty queue still takes it
    with pytest.raises(Overloaded, match="queued tokens"):
        s.enqueue(Item(1))
    assert s.admit([]) == [big]
    s.enqueue(Item(20))  # 30 tokens
    with pytest.raises(Overloaded):
        s.enqueue(Item(15))  # 30 + 25 > 50
    s.enqueue(Item(5))  # 30 + 15 fits
    assert s.queued_tokens == 45


def test_cancelled_items_are_dropped():
    s = Scheduler(EngineConfig())
    a, b = Item(1), Item(1, cancelled=True)
    s.enqueue(a)
    s.enqueue(b)
    assert s.drop_cancelled() == [b]
    assert s.admit([]) == [a]


def test_prefill_groups_keep_padding_small():
    from plugboard_server.engine.scheduler import plan_prefill

    assert plan_prefill([10, 12, 11]) == [[0, 2, 1]]  # little padding: one forward
    groups = plan_prefill([15] * 20 + [31] * 10)
    assert groups == [list(range(20)), list(range(20, 30))]  # 20 rows x 16 padded tokens: split
    lengths = [5, 300, 7, 290, 6]
    groups = plan_prefill(lengths)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    for g in groups:
        width = max(lengths[i] for i in g)
        assert width * len(g) - sum(lengths[i] for i in g) <= max(64, sum(lengths[i] for i in g) // 5)
