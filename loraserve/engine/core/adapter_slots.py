"""Which adapters occupy which device slots. Pure Python: the tensors live in `lora.py`.

A slot is pinned while any running sequence uses its adapter; only unpinned slots are evicted, least
recently used first, so a running request never loses its adapter mid-generation.
"""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.num_slots = num_slots
        self._slot: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # unpinned residents, oldest first
        self._free = list(range(num_slots - 1, -1, -1))

    def __contains__(self, key: str) -> bool:
        return key in self._slot

    def slot_of(self, key: str) -> int | None:
        return self._slot.get(key)

    def pins(self, key: str) -> int:
        return self._pins.get(key, 0)

    @property
    def num_pinned(self) -> int:
        return sum(1 for n in self._pins.values() if n > 0)

    @property
    def resident(self) -> list[str]:
        return list(self._slot)

    def can_acquire(self, key: str) -> bool:
        return key in self._slot or bool(self._free) or bool(self._lru)

    def acquire(self, key: str) -> tuple[int, bool, str | None] | None:
        """Pin `key`; returns (slot, needs_load, evicted_key), or None when every slot is pinned."""
        if key in self._slot:
            self._lru.pop(key, None)
            self._pins[key] = self._pins.get(key, 0) + 1
            return self._slot[key], False, None
        evicted = None
        if self._free:
            slot = self._free.pop()
        elif self._lru:
            evicted, _ = self._lru.popitem(last=False)
            slot = self._slot.pop(evicted)
            self._pins.pop(evicted, None)
        else:
            return None
        self._slot[key] = slot
        self._pins[key] = 1
        return slot, True, evicted

    def release(self, key: str) -> None:
        n = self._pins.get(key, 0)
        if n <= 0:
            raise RuntimeError(f"release of an unpinned adapter {key!r}")
        self._pins[key] = n - 1
        if n == 1:
            self._lru[key] = None

    def drop(self, key: str) -> bool:
        """Forget an unpinned adapter (deleted finetune); False if it is pinned or absent."""
        if key not in self._slot or self._pins.get(key, 0) > 0:
            return False
        self._lru.pop(key, None)
        self._pins.pop(key, None)
        self._free.append(self._slot.pop(key))
        return True
