"""Group commit answers each caller with its own result, shares batches, and never loses a caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from fleetward.errors import Conflict, FleetwardError, ServerError
from fleetward.store.batching import Batcher
from fleetward.store.parallel import ParallelMap


class Recorder:
    """A batch function that records the batches it saw; odd numbers are refused."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self._delay = delay

    def __call__(self, items: Sequence[int]) -> list[int | FleetwardError]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self._delay:
            threading.Event().wait(self._delay)
        return [item * 10 if item % 2 == 0 else Conflict(f"{item} is odd") for item in items]


async def test_each_caller_gets_its_own_answer_or_its_own_refusal() -> None:
    recorder = Recorder()
    async with Batcher(recorder, name="test", max_batch=8, max_pending=64) as batcher:
        results = await asyncio.gather(*(batcher.submit(item) for item in range(20)), return_exceptions=True)
    for item, result in zip(range(20), results, strict=True):
        if item % 2 == 0:
            assert result == item * 10
        else:
            assert isinstance(result, Conflict)
            assert result.message == f"{item} is odd"


async def test_requests_arriving_during_a_batch_share_the_next_one() -> None:
    recorder = Recorder(delay=0.05)
    async with Batcher(recorder, name="test", max_batch=100, max_pending=200) as batcher:
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch is now running
        await asyncio.gather(first, *(batcher.submit(item * 2) for item in range(1, 50)))
    assert len(recorder.batches) == 2
    assert sorted(recorder.batches[1]) == [item * 2 for item in range(1, 50)]
    assert recorder.threads == {next(iter(recorder.threads))}, "one thread does all batches"


async def test_a_batch_is_never_larger_than_the_limit() -> None:
    recorder = Recorder(delay=0.01)
    async with Batcher(recorder, name="test", max_batch=5, max_pending=100) as batcher:
        await asyncio.gather(*(batcher.submit(item * 2) for item in range(40)))
    assert max(len(batch) for batch in recorder.batches) <= 5
    assert sorted(item for batch in recorder.batches for item in batch) == [item * 2 for item in range(40)]


async def test_a_failing_batch_fails_every_caller_in_it_and_the_worker_lives_on() -> None:
    calls = 0

    def explode_once(items: Sequence[int]) -> list[int | FleetwardError]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return list(items)

    async with Batcher(explode_once, name="test", max_batch=10, max_pending=10) as batcher:
        with pytest.raises(ServerError, match="test failed"):
            await batcher.submit(1)
        assert await batcher.submit(2) == 2


async def test_a_full_queue_makes_callers_wait_instead_of_growing() -> None:
    gate = threading.Event()

    def slow(items: Sequence[int]) -> list[int | FleetwardError]:
        gate.wait(5)
        return list(items)

    async with Batcher(slow, name="test", max_batch=1, max_pending=2) as batcher:
        tasks = [asyncio.create_task(batcher.submit(item)) for item in range(6)]
        await asyncio.sleep(0.05)
        # One item is in the running batch and two fill the queue: the other three wait to be queued.
        assert batcher.pending == 2
        gate.set()
        assert await asyncio.gather(*tasks) == list(range(6))


async def test_submitting_to_a_stopped_batcher_is_refused() -> None:
    batcher: Batcher[int, int] = Batcher(Recorder(), name="test", max_batch=1, max_pending=1)
    with pytest.raises(ServerError, match="not running"):
        await batcher.submit(2)


def test_parallel_map_keeps_input_order_across_threads() -> None:
    parallel = ParallelMap(3, name="test")
    try:
        assert parallel.map_all(lambda item: item * item, list(range(100))) == [
            item * item for item in range(100)
        ]
        assert parallel.map_all(lambda item: item, []) == []
        assert parallel.map_all(lambda item: item + 1, [41]) == [42]
    finally:
        parallel.close()
