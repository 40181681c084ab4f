"""``header_list`` spells out the pairs of 1 to 3 headers (every exactly-once output has at
least one): each length gives what the plain pairing gives, in order, duplicates and all,
and a flat tuple of odd length is refused rather than losing its last name."""

from __future__ import annotations

import pytest

from oncely.brokers._kafka_options import flat_headers, header_list


@pytest.mark.parametrize("count", range(6))
def test_every_length_pairs_names_with_their_values_in_order(count: int) -> None:
    flat = tuple(x for i in range(count) for x in (f"h{i}", b"v%d" % i))
    assert header_list(flat) == [(f"h{i}", b"v%d" % i) for i in range(count)]


def test_a_repeated_name_and_an_empty_value_are_kept() -> None:
    flat = ("a", b"1", "a", b"", "b", b"3")
    assert header_list(flat) == [("a", b"1"), ("a", b""), ("b", b"3")]


def test_flat_headers_round_trips_through_header_list() -> None:
    headers = {"oncely-key": "k", "x": "é", "oncely-message-id": "m"}
    assert header_list(flat_headers(headers)) == [(k, v.encode()) for k, v in headers.items()]


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_an_odd_length_is_refused(size: int) -> None:
    flat = tuple(f"x{i}" for i in range(size))
    with pytest.raises(ValueError):
        header_list(flat)
