"""The per-partition bookkeeping of the Kafka adapter, without a broker: contiguous commits,
per-key ordering and the window."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord, TopicPartition

from oncely.brokers._kafka_track import PartitionTrack

TP = TopicPartition("t", 0)


def rec(offset: int, key: bytes | None = None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t", 0, offset, 0, 0, key, b"", None, 0, 0, ())


def test_commit_point_stops_at_the_lowest_unfinished_offset() -> None:
    track = PartitionTrack(TP, ordering="key", start=10)
    records = [rec(o) for o in range(10, 15)]
    for r in records:
        track.take(r)
    assert track.admit(100) == records  # no keys: all may run at once
    for r in (records[1], records[2], records[4]):
        track.complete(r)
    assert track.commit_point() == 10, "offset 10 still runs: nothing past it is committed"
    track.complete(records[0])
    assert track.commit_point() == 13
    track.complete(records[3])
    assert track.commit_point() == 15 and track.window == 0


def test_same_key_waits_different_keys_run() -> None:
    track = PartitionTrack(TP, ordering="key")
    a1, b1, a2, a3 = rec(0, b"a"), rec(1, b"b"), rec(2, b"a"), rec(3, b"a")
    for r in (a1, b1, a2, a3):
        track.take(r)
    assert track.admit(100) == [a1, b1]
    assert track.complete(b1) is None
    assert track.complete(a1) == a2
    assert track.complete(a2) == a3
    assert track.complete(a3) is None
    assert track.commit_point() == 4


def test_partition_ordering_runs_one_at_a_time() -> None:
    track = PartitionTrack(TP, ordering="partition")
    records = [rec(o, bytes([o])) for o in range(3)]
    for r in records:
        track.take(r)
    assert track.admit(100) == records[:1]
    assert track.complete(records[0]) == records[1]


def test_window_bounds_admission_and_the_backlog_holds_the_rest() -> None:
    track = PartitionTrack(TP, ordering="key")
    records = [rec(o) for o in range(8)]
    for r in records:
        track.take(r)
    assert track.admit(5) == records[:5]
    assert len(track.backlog) == 3 and track.window == 5
    assert track.commit_point() == 0
    track.complete(records[0])
    assert track.admit(5) == records[5:6]
    for r in records[1:6]:
        track.complete(r)
    assert track.commit_point() == 6, "the backlog's first record holds the commit"


def test_a_record_below_the_position_is_dropped() -> None:
    track = PartitionTrack(TP, ordering="key", start=5)
    track.take(rec(4))
    track.take(rec(5))
    assert [r.offset for r in track.admit(10)] == [5]
    assert track.advance() == []


def test_head_does_not_pass_a_done_record_advance_has_not_returned() -> None:
    track = PartitionTrack(TP, ordering="key")
    records = [rec(o) for o in range(3)]
    for r in records:
        track.take(r)
    track.admit(10)
    track.complete(records[0])
    assert track.advance() == [0]
    track.complete(records[1])  # done after the advance: its outputs are not sent yet
    assert track.head() == 1, "exactly-once must not commit past offset 1 yet"
    assert track.advance() == [1] and track.head() == 2


def test_take_all_drops_records_below_the_position() -> None:
    track = PartitionTrack(TP, ordering="key", start=5)
    track.take_all([rec(3), rec(4), rec(5), rec(6)])
    track.take_all([rec(6)])  # a fetch that raced a seek, all seen already
    assert [r.offset for r in track.admit(10)] == [5, 6]
    assert track.position == 7


def test_exactly_once_window_counts_done_records_until_they_are_passed() -> None:
    track = PartitionTrack(TP, ordering="key", eos=object())
    records = [rec(o) for o in range(4)]
    track.take_all(records)
    track.admit(10)
    track.complete(records[1])
    track.complete(records[2])
    assert track.window == 4, "the outputs of 1 and 2 wait in memory behind offset 0"
    assert track.admit(4) == [] and track.advance() == []
    track.complete(records[0])
    assert track.advance() == [0, 1, 2] and track.window == 1


def test_a_key_runs_its_records_in_order_after_its_queue_emptied() -> None:
    track = PartitionTrack(TP, ordering="key")
    a1, a2, a3 = rec(0, b"a"), rec(1, b"a"), rec(2, b"a")
    track.take_all([a1, a2])
    assert track.admit(10) == [a1]
    assert track.complete(a1) == a2
    track.take_all([a3])
    assert track.admit(10) == [], "a2 still runs: a3 waits behind it"
    assert track.complete(a2) == a3
    assert track.complete(a3) is None
    track.take_all([rec(3, b"a")])
    assert [r.offset for r in track.admit(10)] == [3], "the key is free again"
