"""Paged KV-cache bookkeeping: page ownership, prefix sharing and copy-on-write.

The device tensors (per layer ``k_cache``/``v_cache`` of shape ``[num_pages, page_size, Hkv, D]``, see
docs/contracts.md) belong to the engine. This module only decides which page every token of every
sequence lives in, so the scheduler can admit, grow, fork and preempt sequences without touching the GPU.

Page states (each page is in exactly one):
- *free*: in the free deque, no owner, content meaningless.
- *evictable*: no owner but registered in the prefix cache; reusable by a later prefix hit, evicted
  (LRU) only when the free deque is empty.
- *in use*: referenced by at least one sequence page list, or pinned by a pending copy.

Pages are shared by prefix-cache hits and by ``fork``. A page that more than one sequence references, or
whose content is registered in the prefix cache, is never written: a sequence about to write into it gets
a private page instead, and if rows it must keep live there, a pending ``(src, dst)`` copy is recorded.
The engine applies ``take_pending_copies()`` to every layer's caches before the next forward.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from autodeploy.errors import CacheCapacityError
from autodeploy.runtime.state_slots import StateSlotAllocator

__all__ = ["KVCacheManager", "bytes_per_page", "pages_for_budget"]


def bytes_per_page(page_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Device bytes one page costs: K and V rows of ``page_size`` tokens in every layer."""
    for name, value in (("page_size", page_size), ("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("dtype_bytes", dtype_bytes)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return 2 * num_layers * page_size * num_kv_heads * head_dim * dtype_bytes


def pages_for_budget(budget_bytes: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                     dtype_bytes: int) -> int:
    """How many whole pages fit in ``budget_bytes`` of device memory (K and V, all layers)."""
    per_page = bytes_per_page(page_size, num_layers, num_kv_heads, head_dim, dtype_bytes)
    return max(0, budget_bytes) // per_page


@dataclass
class _Sequence:
    """Per-sequence state: its pages and how far its KV is written."""

    pages: list[int] = field(default_factory=list)
    # Chain hashes of the leading full pages whose KV is written; the parent of page i+1 is entry i.
    block_hashes: list[int] = field(default_factory=list)
    num_computed: int = 0


class KVCacheManager:
    """Owns the mapping sequence -> pages, the prefix cache and the copy-on-write queue.

    Every public call costs O(pages it touches) (plus hashing the tokens it is given); nothing scans
    all pages except ``check_invariants``, which is meant for tests.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 state_slots: "StateSlotAllocator | None" = None) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount: list[int] = [0] * num_pages  # number of sequence page lists holding the page
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_page: dict[int, int] = {}
        self._page_hash: dict[int, int] = {}
        self._pinned: dict[int, int] = {}  # page -> number of pending copies that use it
        self._pending: dict[int, int] = {}  # dst -> src, in the order recorded
        self._seqs: dict[Hashable, _Sequence] = {}
        self._query_tokens = 0
        self._hit_tokens = 0
        # Stateful models: one recurrent-state slot per sequence, taken and freed with its pages
        # (runtime/state_slots.py). Prefix reuse would skip tokens whose state nothing stores: refused.
        if state_slots is not None and enable_prefix_caching:
            raise ValueError("prefix caching cannot serve a stateful model: its recurrent state is not cached")
        self.state_slots = state_slots

    # ------------------------------------------------------------------ sizes and stats
    def pages_needed(self, num_tokens: int) -> int:
        """Pages a sequence of ``num_tokens`` tokens occupies."""
        return -(-num_tokens // self.page_size)

    @property
    def num_free_pages(self) -> int:
        """Pages a new allocation can take: free plus evictable (cached, unowned)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        """Pages owned by some sequence or pinned by a pending copy."""
        return self.num_pages - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages registered in the prefix cache (owned or evictable)."""
        return len(self._page_hash)

    def usage(self) -> dict[str, float]:
        """Occupancy and prefix-cache hit statistics, for logs and the scheduler."""
        hit_rate = self._hit_tokens / self._query_tokens if self._query_tokens else 0.0
        return {
            "num_pages": self.num_pages,
            "page_size": self.page_size,
            "free_pages": len(self._free),
            "evictable_pages": len(self._evictable),
            "used_pages": self.num_used_pages,
            "cached_pages": len(self._page_hash),
            "pinned_pages": len(self._pinned),
            "num_sequences": len(self._seqs),
            "usage": self.num_used_pages / self.num_pages,
            "prefix_query_tokens": self._query_tokens,
            "prefix_hit_tokens": self._hit_tokens,
            "prefix_hit_rate": hit_rate,
        }

    def all_free(self) -> bool:
        """True when nothing is owned or pinned: every page is free or evictable (no leak)."""
        slots_free = self.state_slots is None or self.state_slots.all_free()
        return (not self._seqs and not self._pinned and not self._pending and self.num_free_pages == self.num_pages
                and slots_free)

    # ------------------------------------------------------------------ sequence queries
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def page_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's pages in position order (a copy)."""
        return list(self._seq(seq_id).pages)

    def pages_view(self, seq_id: Hashable) -> Sequence[int]:
        """The sequence's page list itself, not a copy: read it, never modify it (hot path)."""
        return self._seq(seq_id).pages

    def num_pages_of(self, seq_id: Hashable) -> int:
        return len(self._seq(seq_id).pages)

    def num_computed(self, seq_id: Hashable) -> int:
        """Leading tokens whose KV is written (from ``allocate`` hits and ``commit``)."""
        return self._seq(seq_id).num_computed

    def slot(self, seq_id: Hashable, position: int) -> int:
        """Flat cache slot ``page * page_size + row`` of the token at ``position``."""
        pages = self._seq(seq_id).pages
        if not 0 <= position < len(pages) * self.page_size:
            raise IndexError(f"position {position} outside the {len(pages)} pages of sequence {seq_id!r}")
        page, row = divmod(position, self.page_size)
        return pages[page] * self.page_size + row

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether ``allocate`` would succeed now, counting pages that prefix hits reuse (and, for a stateful
        model, a free state slot)."""
        if self.state_slots is not None and not self.state_slots.num_free:
            return False
        return self._plan(token_ids)[2] <= self.num_free_pages

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Start ``seq_id`` with known tokens ``token_ids``; return how many leading tokens are cached.

        Reuses registered full pages whose hash chain matches the prefix. The model must compute at least
        one token, so a full hit returns ``len(token_ids) - 1``; the last page then gets a private copy
        (recorded as a pending copy) because the recomputed last token is written into it.
        Raises ``CacheCapacityError`` (changing nothing) if the pages are not available.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already allocated")
        n = len(token_ids)
        if n == 0:
            raise ValueError("a sequence needs at least one token")
        if self.pages_needed(n) > self.num_pages:
            raise CacheCapacityError(
                f"{n} tokens need {self.pages_needed(n)} pages of {self.page_size} tokens; "
                f"the cache has only {self.num_pages}")
        hits, hashes, need = self._plan(token_ids)
        if need > self.num_free_pages:
            raise CacheCapacityError(f"{n} tokens need {need} free pages now; {self.num_free_pages} are free")
        if self.state_slots is not None:
            self.state_slots.allocate(seq_id)  # CacheCapacityError (nothing changed) when no slot is free

        ps = self.page_size
        full_hit = len(hits) * ps == n
        cow_src = None
        if full_hit:  # the last token is recomputed into a private copy of the last hit page
            cow_src = hits.pop()
            hashes.pop()
        for page in hits:
            self._incref(page)
        copy_rows = cow_src is not None and (n - 1) % ps != 0
        if copy_rows:
            self._pin(cow_src)  # before taking pages, so eviction cannot reclaim the copy source
        pages = hits + [self._take_page() for _ in range(self.pages_needed(n) - len(hits))]
        for page in pages[len(hits):]:
            self._refcount[page] = 1
        if copy_rows:
            self._record_copy(cow_src, pages[len(hits)])
            self._unpin(cow_src)  # _record_copy holds its own pin
        num_cached = n - 1 if full_hit else len(hits) * ps
        self._seqs[seq_id] = _Sequence(pages, hashes, num_cached)
        if self.enable_prefix_caching:
            self._query_tokens += n
            self._hit_tokens += num_cached
        return num_cached

    def ensure_slots(self, seq_id: Hashable, num_total_tokens: int) -> bool:
        """Make the sequence able to write positions ``[num_computed, num_total_tokens)``.

        Appends pages and gives the sequence private copies of shared/cached pages in that range.
        All-or-nothing: returns False and changes nothing if too few pages are free. Raises
        ``CacheCapacityError`` if the sequence could not fit even alone.
        """
        seq = self._seq(seq_id)
        return self._reserve(seq, seq.num_computed, num_total_tokens)

    def prepare_write(self, seq_id: Hashable, start_pos: int, num_tokens: int) -> bool:
        """Like ``ensure_slots`` but for an explicit write range ``[start_pos, start_pos + num_tokens)``."""
        if start_pos < 0 or num_tokens < 0:
            raise ValueError(f"bad write range start={start_pos} num_tokens={num_tokens}")
        return self._reserve(self._seq(seq_id), start_pos, start_pos + num_tokens)

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that the first ``num_computed`` tokens have KV written; cache newly full pages."""
        seq = self._seq(seq_id)
        ps = self.page_size
        if not 0 <= num_computed <= len(token_ids):
            raise ValueError(f"num_computed={num_computed} outside [0, {len(token_ids)}]")
        if num_computed > len(seq.pages) * ps:
            raise ValueError(f"num_computed={num_computed} exceeds the {len(seq.pages)} pages of {seq_id!r}")
        seq.num_computed = num_computed
        full = num_computed // ps
        if len(seq.block_hashes) > full:  # rollback: hashes past the written prefix no longer describe it
            del seq.block_hashes[full:]
        if not self.enable_prefix_caching:
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), full):
            h = hash((parent, tuple(token_ids[i * ps:(i + 1) * ps])))
            seq.block_hashes.append(h)
            page = seq.pages[i]
            # First writer wins: a duplicate (e.g. a copy-on-write page) stays private.
            if h not in self._hash_to_page and page not in self._page_hash:
                self._hash_to_page[h] = page
                self._page_hash[page] = h
            parent = h

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make ``child_id`` share every page of ``parent_id`` (beam search, ``n > 1``)."""
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already allocated")
        parent = self._seq(parent_id)
        if self.state_slots is not None:
            raise NotImplementedError("forking a sequence of a stateful model (n > 1, beam search) would need a "
                                      "copy of its recurrent state; not supported")
        for page in parent.pages:
            self._refcount[page] += 1
        self._seqs[child_id] = _Sequence(list(parent.pages), list(parent.block_hashes), parent.num_computed)

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence; cached pages stay reusable (evictable) until their page is needed."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        if self.state_slots is not None:
            self.state_slots.free(seq_id)
        # Tail pages first, so LRU eviction drops the least shareable (longest-prefix) pages first.
        for page in reversed(seq.pages):
            self._decref(page)

    def peek_pending_copies(self) -> list[tuple[int, int]]:
        """The ``(src_page, dst_page)`` copies :meth:`take_pending_copies` would return, left pending: apply them,
        then take them, so a copy interrupted half-way is applied again (copies are idempotent)."""
        return [(src, dst) for dst, src in self._pending.items()]

    def state_slot(self, seq_id: Hashable, start: int, num_new: int) -> int:
        """The recurrent-state slot of a step computing tokens ``[start, start + num_new)`` of the sequence (-1
        for a stateless model); records that its state then holds ``start + num_new`` tokens."""
        if self.state_slots is None:
            return -1
        return self.state_slots.advance(seq_id, start, num_new)

    def state_matches(self, seq_id: Hashable, num_computed: int) -> bool:
        """Whether the sequence's recurrent state holds exactly its ``num_computed`` tokens (always for a
        stateless model): False after a step ran whose tokens were not committed."""
        return self.state_slots is None or self.state_slots.consumed(seq_id) == num_computed

    def seq_ids(self) -> list[Hashable]:
        """Every allocated sequence (for the engine's consistency repair after a failed step)."""
        return list(self._seqs)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Return and clear the ``(src_page, dst_page)`` copies to apply to every layer before the forward.

        Sources and destinations are disjoint and destinations distinct, so the copies may run in any
        order or as one batched gather/scatter.
        """
        copies = [(src, dst) for dst, src in self._pending.items()]
        self._pending.clear()
        for src, dst in copies:
            self._unpin(src)
            self._unpin(dst)
        return copies

    # ------------------------------------------------------------------ invariants (tests)
    def check_all_free(self) -> None:
        """Raise AssertionError unless the bookkeeping is consistent and every page is back: no sequence, pin or
        pending copy left, free plus evictable pages equal to ``num_pages`` (no page leaked or lost)."""
        self.check_invariants()
        if not self.all_free():
            u = self.usage()
            raise AssertionError(
                f"KV pages not all returned: {u['free_pages']} free + {u['evictable_pages']} evictable of "
                f"{self.num_pages}; sequences still allocated: {list(self._seqs)[:8]} ({len(self._seqs)}), "
                f"pinned {len(self._pinned)}, pending copies {len(self._pending)}")

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. O(num_pages); for tests."""
        def fail(msg: str) -> None:
            raise AssertionError(msg)

        owners = [0] * self.num_pages
        ps = self.page_size
        for sid, seq in self._seqs.items():
            if len(set(seq.pages)) != len(seq.pages):
                fail(f"sequence {sid!r} holds a page twice: {seq.pages}")
            if seq.num_computed > len(seq.pages) * ps:
                fail(f"sequence {sid!r} computed {seq.num_computed} tokens in {len(seq.pages)} pages")
            if len(seq.block_hashes) > seq.num_computed // ps:
                fail(f"sequence {sid!r} has hashes for unwritten pages")
            for i, page in enumerate(seq.pages):
                owners[page] += 1
                h = self._page_hash.get(page)
                if h is not None and i < len(seq.block_hashes) and h != seq.block_hashes[i]:
                    fail(f"page {page} registered under a hash other than sequence {sid!r}'s")
        pins = [0] * self.num_pages
        for dst, src in self._pending.items():
            pins[dst] += 1
            pins[src] += 1
            if src in self._pending:
                fail(f"pending copy source {src} is itself a pending destination")
        for page in range(self.num_pages):
            if owners[page] != self._refcount[page]:
                fail(f"page {page}: refcount {self._refcount[page]} but {owners[page]} owners")
            if pins[page] != self._pinned.get(page, 0):
                fail(f"page {page}: pinned {self._pinned.get(page, 0)} but used by {pins[page]} pending copies")
        if set(self._pinned) != {p for p in range(self.num_pages) if pins[p]}:
            fail("pin table holds zero entries")
        free = set(self._free)
        if len(free) != len(self._free):
            fail("a page is on the free list twice")
        if free & set(self._evictable):
            fail("a page is both free and evictable")
        for page in free:
            if owners[page] or pins[page] or page in self._page_hash:
                fail(f"free page {page} is owned, pinned or cached")
        for page in self._evictable:
            if owners[page] or pins[page] or page not in self._page_hash:
                fail(f"evictable page {page} is owned, pinned or not cached")
        in_use = sum(1 for p in range(self.num_pages) if owners[p] or pins[p])
        if in_use + len(free) + len(self._evictable) != self.num_pages:
            fail("pages are lost or double counted across free / evictable / in use")
        if len(self._hash_to_page) != len(self._page_hash):
            fail("hash tables differ in size")
        for h, page in self._hash_to_page.items():
            if self._page_hash.get(page) != h:
                fail(f"hash tables disagree on page {page}")

    # ------------------------------------------------------------------ internals
    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _plan(self, token_ids: Sequence[int]) -> tuple[list[int], list[int], int]:
        """Prefix hits, their hashes, and how many free-or-evictable pages ``allocate`` would consume."""
        ps = self.page_size
        n = len(token_ids)
        hits: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            parent = None
            for i in range(n // ps):
                h = hash((parent, tuple(token_ids[i * ps:(i + 1) * ps])))
                page = self._hash_to_page.get(h)
                if page is None:
                    break
                hits.append(page)
                hashes.append(h)
                parent = h
        held = hits
        if hits and len(hits) * ps == n:  # full hit: last page replaced; pinned only if rows are copied
            held = hits if (n - 1) % ps else hits[:-1]
            new_pages = 1
        else:
            new_pages = self.pages_needed(n) - len(hits)
        # Held pages that are evictable leave the reusable pool.
        reclaimed = sum(1 for page in held if page in self._evictable)
        return hits, hashes, new_pages + reclaimed

    def _reserve(self, seq: _Sequence, start: int, end: int) -> bool:
        """Grow ``seq`` to cover ``end`` tokens and privatize the pages written in ``[start, end)``."""
        ps = self.page_size
        total = self.pages_needed(end)
        if total > self.num_pages:
            raise CacheCapacityError(
                f"{end} tokens need {total} pages of {ps} tokens; the cache has only {self.num_pages}")
        grow = max(0, total - len(seq.pages))
        written = range(start // ps, min(total, len(seq.pages))) if start < end else range(0)
        cow = [i for i in written if self._refcount[seq.pages[i]] > 1 or seq.pages[i] in self._page_hash]
        if grow + len(cow) > self.num_free_pages:
            return False
        for i in cow:
            old = seq.pages[i]
            new = self._take_page()
            self._refcount[new] = 1
            seq.pages[i] = new
            if i == start // ps and start % ps:  # rows before ``start`` in this page must survive
                self._record_copy(old, new)
            self._decref(old)
        for _ in range(grow):
            page = self._take_page()
            self._refcount[page] = 1
            seq.pages.append(page)
        if cow and len(seq.block_hashes) > cow[0]:  # privatized pages are no longer the cached ones
            del seq.block_hashes[cow[0]:]
        return True

    def _record_copy(self, src: int, dst: int) -> None:
        # A source that is itself an unapplied destination holds its own source's data: copy from there,
        # so no page is both read and written by the batch.
        src = self._pending.get(src, src)
        self._pending[dst] = src
        self._pin(src)
        self._pin(dst)

    def _take_page(self) -> int:
        """A page with no owner: from the free list, else evict the least recently freed cached page."""
        if self._free:
            return self._free.popleft()
        page, _ = self._evictable.popitem(last=False)
        del self._hash_to_page[self._page_hash.pop(page)]
        return page

    def _is_idle(self, page: int) -> bool:
        return self._refcount[page] == 0 and page not in self._pinned

    def _incref(self, page: int) -> None:
        if self._is_idle(page):
            del self._evictable[page]  # idle pages reachable by hash are evictable, never free
        self._refcount[page] += 1

    def _decref(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._is_idle(page):
            self._release(page)

    def _pin(self, page: int) -> None:
        if self._is_idle(page):
            del self._evictable[page]
        self._pinned[page] = self._pinned.get(page, 0) + 1

    def _unpin(self, page: int) -> None:
        count = self._pinned[page] - 1
        if count:
            self._pinned[page] = count
            return
        del self._pinned[page]
        if self._refcount[page] == 0:
            self._release(page)

    def _release(self, page: int) -> None:
        if page in self._page_hash:
            self._evictable[page] = None
        else:
            self._free.append(page)
