"""SlotTable: which adapters hold device slots, pinned while used, evicted least recently used first."""

from __future__ import annotations

import pytest

from loraserve.engine.core.adapter_slots import SlotTable


def test_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        SlotTable(0)


def test_acquire_fills_free_slots_then_reuses_resident_ones() -> None:
    t = SlotTable(3)
    got = [t.acquire(k) for k in "abc"]
    assert [g[1] for g in got if g] == [True, True, True]  # each needs loading
    assert sorted(g[0] for g in got if g) == [0, 1, 2]
    assert all(g[2] is None for g in got if g)  # nothing evicted while slots were free
    assert t.resident == ["a", "b", "c"] and "a" in t and "z" not in t
    slot_a = t.slot_of("a")
    assert t.acquire("a") == (slot_a, False, None)  # resident: no load, same slot
    assert t.pins("a") == 2 and t.num_pinned == 3
    assert t.slot_of("z") is None


def test_release_counts_pins() -> None:
    t = SlotTable(1)
    t.acquire("a")
    t.acquire("a")
    t.release("a")
    assert t.pins("a") == 1
    assert t.acquire("b") is None  # a is still pinned once
    t.release("a")
    assert t.pins("a") == 0 and t.num_pinned == 0
    with pytest.raises(RuntimeError):
        t.release("a")
    with pytest.raises(RuntimeError):
        t.release("never-seen")


def test_eviction_is_least_recently_released_first() -> None:
    t = SlotTable(3)
    for k in "abc":
        t.acquire(k)
    for k in "bac":  # release order = recency order: b is the oldest unpinned resident
        t.release(k)
    slot_b = t.slot_of("b")
    assert t.acquire("d") == (slot_b, True, "b")
    assert "b" not in t and t.slot_of("d") == slot_b
    slot_a = t.slot_of("a")
    assert t.acquire("e") == (slot_a, True, "a")
    # Re-pinning c makes it not evictable; releasing d then e makes d the next victim.
    t.acquire("c")
    t.release("d")
    t.release("e")
    assert t.acquire("f") == (slot_b, True, "d")


def test_reacquire_refreshes_recency() -> None:
    t = SlotTable(2)
    t.acquire("a")
    t.acquire("b")
    t.release("a")
    t.release("b")
    t.acquire("a")  # a used again: b is now the least recently used
    t.release("a")
    got = t.acquire("c")
    assert got is not None and got[2] == "b"
    assert set(t.resident) == {"a", "c"}


def test_never_evicts_pinned_adapters() -> None:
    t = SlotTable(2)
    t.acquire("a")
    t.acquire("b")
    assert not t.can_acquire("c")
    assert t.acquire("c") is None
    assert set(t.resident) == {"a", "b"} and t.pins("a") == t.pins("b") == 1
    assert t.can_acquire("a")  # resident adapters can always gain another pin
    t.release("b")
    assert t.can_acquire("c")
    got = t.acquire("c")
    assert got is not None and got[2] == "b"
    assert t.pins("a") == 1 and "a" in t


def test_drop_forgets_only_unpinned_adapters() -> None:
    t = SlotTable(2)
    t.acquire("a")
    t.acquire("b")
    assert not t.drop("a")  # pinned
    assert not t.drop("zzz")  # absent
    t.release("a")
    slot_a = t.slot_of("a")
    assert t.drop("a")
    assert "a" not in t and t.pins("a") == 0
    # Its slot is free again: the next adapter takes it without evicting anyone.
    assert t.acquire("c") == (slot_a, True, None)
    # A dropped adapter is not in the LRU any more: releasing and evicting never names it.
    t.release("b")
    t.release("c")
    victims = [t.acquire(k)[2] for k in ("d", "e")]  # type: ignore[index]
    assert victims == ["b", "c"]
