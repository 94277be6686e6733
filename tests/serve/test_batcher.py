"""Triton's dynamic-batching rules on a fake clock (times in microseconds), then the threaded batcher."""

import asyncio
import time

import pytest

from glmkit.serve.batcher import (
    QUEUE_FULL,
    TIMEOUT,
    BatcherError,
    BatchItem,
    BatchQueue,
    DynamicBatcher,
    DynamicBatchingConfig,
    QueuePolicy,
)
from glmkit.serve.stats import ModelStats


def queue(**kw):
    return BatchQueue(DynamicBatchingConfig(**kw))


def add(q, name, t, size=1, **kw):
    it = BatchItem(name, size, shape_key=kw.pop("shape", None))
    q.enqueue(it, t, **kw)
    return it


def names(batch):
    return [it.payload for it in batch]


def test_no_delay_sends_what_is_there_up_to_max_batch_size():
    q = queue(max_batch_size=4)
    for i, t in enumerate([0, 1, 2, 3, 4, 5]):
        add(q, i, t)
    assert names(q.next_batch(10)[0]) == [0, 1, 2, 3]
    assert names(q.next_batch(10)[0]) == [4, 5]
    assert q.next_batch(10) == ([], None)


def test_queue_delay_waits_for_more_then_sends():
    q = queue(max_batch_size=8, max_queue_delay_microseconds=1000)
    add(q, "a", 0)
    add(q, "b", 300)
    assert q.next_batch(500) == ([], 1000)  # wake when the oldest has waited the delay
    add(q, "c", 600, size=2)
    assert names(q.next_batch(1000)[0]) == ["a", "b", "c"]


def test_full_batch_goes_without_waiting():
    q = queue(max_batch_size=3, max_queue_delay_microseconds=10**6)
    for name in "abcd":
        add(q, name, 0)
    assert names(q.next_batch(1)[0]) == ["a", "b", "c"]
    assert q.next_batch(2) == ([], 10**6)


def test_preferred_batch_size():
    q = queue(max_batch_size=8, preferred_batch_size=[2, 4], max_queue_delay_microseconds=1000)
    for name in "abc":
        add(q, name, 0)
    assert names(q.next_batch(10)[0]) == ["a", "b"]  # the largest preferred size reachable, at once
    assert q.next_batch(30) == ([], 1000)  # "c" alone is no preferred size: wait
    add(q, "d", 40)
    assert names(q.next_batch(50)[0]) == ["c", "d"]
    for name in "efghi":
        add(q, name, 60)
    assert names(q.next_batch(70)[0]) == ["e", "f", "g", "h"]  # never past the largest preferred size
    assert names(q.next_batch(1060)[0]) == ["i"]  # its delay is over


def test_shape_change_closes_the_batch():
    q = queue(max_batch_size=8, max_queue_delay_microseconds=1000)
    add(q, "a", 0, shape=(1, 3))
    add(q, "b", 0, shape=(1, 5))
    add(q, "c", 0, shape=(1, 3))
    assert names(q.next_batch(1)[0]) == ["a"]


def test_max_queue_size_rejects():
    q = queue(max_batch_size=2, default_queue_policy=QueuePolicy(max_queue_size=2))
    add(q, "a", 0)
    add(q, "b", 0)
    with pytest.raises(BatcherError, match=QUEUE_FULL):
        add(q, "c", 0)
    with pytest.raises(ValueError, match="batch size"):
        add(q, "big", 0, size=3)


def test_timeouts_reject_or_delay_and_override_only_lowers():
    policy = QueuePolicy(default_timeout_microseconds=500, allow_timeout_override=True)
    q = queue(max_batch_size=4, max_queue_delay_microseconds=10**6, default_queue_policy=policy)
    add(q, "a", 0)
    add(q, "b", 100, timeout_us=100)  # lowered: deadline 200
    add(q, "c", 100, timeout_us=10**6)  # cannot raise: deadline 600
    assert q.next_batch(150) == ([], 200)
    assert [(it.payload, it.error) for it in q.expire(550)] == [("a", TIMEOUT), ("b", TIMEOUT)]
    assert len(q) == 1
    delay = QueuePolicy(timeout_action="DELAY", default_timeout_microseconds=500)
    q = queue(max_batch_size=2, default_queue_policy=delay)
    add(q, "old", 0)
    add(q, "new", 400)
    assert q.expire(600) == []
    assert names(q.next_batch(600)[0]) == ["new", "old"]  # the timed-out request went behind


def test_priority_levels():
    q = queue(max_batch_size=2, priority_levels=2, default_priority_level=2)
    add(q, "low", 0)
    add(q, "high", 1, priority=1)
    add(q, "low2", 2, priority=2)
    assert names(q.next_batch(5)[0]) == ["high", "low"]
    with pytest.raises(ValueError, match="priority"):
        add(q, "x", 3, priority=3)


def test_config_validation_follows_triton():
    with pytest.raises(ValueError, match="preferred_batch_size"):
        DynamicBatchingConfig(max_batch_size=4, preferred_batch_size=[8])
    with pytest.raises(ValueError, match="default_priority_level"):
        DynamicBatchingConfig(priority_levels=2, default_priority_level=0)
    with pytest.raises(ValueError, match="preserve_ordering"):
        DynamicBatchingConfig(priority_levels=2, default_priority_level=1, preserve_ordering=True)


def test_threaded_batcher_batches_counts_and_preserves_order():
    calls = []

    def execute(payloads):
        calls.append(list(payloads))
        time.sleep(0.01)
        return [p * 10 if p != 3 else ValueError("bad row") for p in payloads]

    policy = QueuePolicy(allow_timeout_override=True)
    stats = ModelStats("m")
    config = DynamicBatchingConfig(
        max_batch_size=8, max_queue_delay_microseconds=50_000, preserve_ordering=True, default_queue_policy=policy
    )
    batcher = DynamicBatcher(config, execute, stats=stats).start()

    async def main():
        done = []

        async def one(i, **kw):
            try:
                r = await batcher.submit(i, **kw)
            except Exception as e:
                r = type(e).__name__
            done.append(i)
            return r

        tasks = [one(0), one(1), one(2, timeout_us=1000), one(3), one(4), one(5)]
        return await asyncio.gather(*tasks), done

    try:
        results, order = asyncio.run(main())
    finally:
        batcher.shutdown()
    assert results == [0, 10, "BatcherError", "ValueError", 40, 50]
    assert order == [0, 1, 2, 3, 4, 5]  # the timeout of 2 came first but was held back
    assert calls == [[0, 1, 3, 4, 5]]
    s = stats.to_triton()
    assert s["inference_count"] == 5 and s["execution_count"] == 1
    assert s["inference_stats"]["success"]["count"] == 4 and s["inference_stats"]["fail"]["count"] == 2
    assert stats.failures["REJECTED"] == 1 and stats.failures["BACKEND"] == 1
