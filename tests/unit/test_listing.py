"""The listing index, its cursors and the merge of partition pages (tables.listing)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from tables.listing import (
    Filter,
    ListingIndex,
    Position,
    decode_cursor,
    encode_cursor,
    merge,
    micros,
    states_for,
)


def pages_of(
    indexes: list[ListingIndex], tenant: str, where: Filter, limit: int
) -> list[list[Position]]:
    """Walk every page of a listing over several partitions, as the API does."""
    pages: list[list[Position]] = []
    before: Position | None = None
    while True:
        found = [index.page(tenant, where, before, limit) for index in indexes]
        kept, cut = merge([f[0] for f in found], limit)
        more = cut or any(f[1] for f in found)
        if kept:
            pages.append(kept)
        if not more:
            return pages
        before = decode_cursor(encode_cursor(kept[-1]))


def test_pages_across_partitions_hold_every_job_once_newest_first() -> None:
    rng = random.Random(7)
    indexes = [ListingIndex() for _ in range(4)]
    expected: list[Position] = []
    for n in range(500):
        created = 1_000_000 + rng.randrange(200)  # many jobs share a creation time
        job_id = f"job_{n:04d}"
        indexes[rng.randrange(4)].put(job_id, "t-a", created, "COMPLETED")
        indexes[rng.randrange(4)].put(f"other_{n}", "t-b", created, "COMPLETED")
        expected.append((created, job_id))
    for limit in (1, 7, 50, 600):
        pages = pages_of(indexes, "t-a", Filter(), limit)
        listed = [p for page in pages for p in page]
        assert listed == sorted(expected, reverse=True)
        assert all(len(page) == limit for page in pages[:-1])


def test_filters_select_states_and_a_creation_window() -> None:
    index = ListingIndex()
    for n in range(10):
        index.put(f"j{n}", "t", 100 + n, "COMPLETED" if n % 2 else "STARTED")
    everything = Filter()
    assert index.page("t", everything, None, 3) == ([(109, "j9"), (108, "j8"), (107, "j7")], True)
    done = Filter(states=states_for("terminal"))
    assert [p[1] for p in index.page("t", done, None, 10)[0]] == ["j9", "j7", "j5", "j3", "j1"]
    assert [p[1] for p in index.page("t", Filter(states=states_for("open")), None, 2)[0]] == [
        "j8",
        "j6",
    ]
    window = Filter(since=103, until=106)  # since inclusive, until exclusive
    assert [p[1] for p in index.page("t", window, None, 10)[0]] == ["j5", "j4", "j3"]
    assert index.page("t", window, (104, "j4"), 10) == ([(103, "j3")], False)
    assert index.page("nobody", everything, None, 10) == ([], False)


def test_a_state_change_updates_the_entry_and_a_removal_drops_it() -> None:
    index = ListingIndex()
    index.put("j1", "t", 5, "STARTED")
    index.put("j2", "t", 3, "STARTED")
    index.put("j1", "t", 5, "COMPLETED")
    assert index.page("t", Filter(states=frozenset({"COMPLETED"})), None, 5) == ([(5, "j1")], False)
    index.remove("j1")
    index.remove("j1")
    assert index.page("t", Filter(), None, 5) == ([(3, "j2")], False)
    index.remove("j2")
    assert index.by_tenant == {} and len(index) == 0


def test_out_of_order_inserts_stay_sorted() -> None:
    index = ListingIndex()
    for created in (5, 1, 9, 3, 7):
        index.put(f"j{created}", "t", created, "CREATED")
    assert [p[0] for p in index.page("t", Filter(), None, 10)[0]] == [9, 7, 5, 3, 1]


def test_cursors_round_trip_and_refuse_anything_else() -> None:
    position = (micros(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)), "job_abc")
    assert decode_cursor(encode_cursor(position)) == position
    for bad in ("", "!!!", "bm90LWEtY3Vyc29y", encode_cursor((1, "x"))[:-3] + "@@"):
        with pytest.raises(ValueError):
            decode_cursor(bad)


def test_micros_is_exact_and_states_for_knows_every_name() -> None:
    at = datetime(2026, 5, 1, tzinfo=UTC)
    assert micros(at + timedelta(microseconds=1)) - micros(at) == 1
    assert states_for("completed") == frozenset({"COMPLETED"})
    assert "CANCELLED" in states_for("terminal") and "ROUTED" in states_for("open")
    with pytest.raises(ValueError):
        states_for("DONE")
