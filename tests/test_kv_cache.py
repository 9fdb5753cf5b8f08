"""Tests of the paged KV-cache bookkeeping (autodeploy.runtime.kv_cache).

A simulated device cache stores, in every slot, the token prefix whose KV it holds. Reading a sequence back
through its page table therefore checks prefix hits, copy-on-write and eviction end to end.
"""

from __future__ import annotations

import random

import pytest

from autodeploy.errors import CacheCapacityError
from autodeploy.runtime.kv_cache import KVCacheManager, bytes_per_page, pages_for_budget


def snapshot(m: KVCacheManager) -> tuple:
    """Everything the manager holds, to prove failed calls change nothing."""
    seqs = {k: (list(s.pages), list(s.block_hashes), s.num_computed) for k, s in m._seqs.items()}
    return (list(m._refcount), list(m._free), list(m._evictable), dict(m._hash_to_page), dict(m._page_hash),
            dict(m._pinned), list(m._pending.items()), seqs, m._query_tokens, m._hit_tokens)


class FakeDevice:
    """Host model of the device cache: slot -> the token prefix whose last token's KV it stores."""

    def __init__(self, m: KVCacheManager) -> None:
        self.m = m
        self.slots: list[tuple[int, ...] | None] = [None] * (m.num_pages * m.page_size)

    def apply_copies(self) -> list[tuple[int, int]]:
        copies = self.m.take_pending_copies()
        srcs, dsts = [s for s, _ in copies], [d for _, d in copies]
        assert len(set(dsts)) == len(dsts) and not set(srcs) & set(dsts), copies
        ps = self.m.page_size
        gathered = [self.slots[s * ps:(s + 1) * ps] for s in srcs]  # batched: read all, then write all
        for dst, rows in zip(dsts, gathered):
            self.slots[dst * ps:(dst + 1) * ps] = rows
        return copies

    def write(self, sid: int, tokens: list[int], start: int, end: int) -> None:
        for p in range(start, end):
            self.slots[self.m.slot(sid, p)] = tuple(tokens[:p + 1])

    def verify(self, sid: int, tokens: list[int], upto: int) -> None:
        for p in range(upto):
            assert self.slots[self.m.slot(sid, p)] == tuple(tokens[:p + 1]), (sid, p)


def run_step(m: KVCacheManager, dev: FakeDevice, sid: int, tokens: list[int], n: int) -> bool:
    """One engine step for ``sid``: reserve, apply copies, write ``n`` tokens' KV, commit."""
    done = m.num_computed(sid)
    if not m.ensure_slots(sid, done + n):
        return False
    dev.apply_copies()
    dev.write(sid, tokens, done, done + n)
    m.commit(sid, tokens, done + n)
    return True


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("ps", [1, 3, 4])
def test_random_stress(ps: int, prefix_caching: bool) -> None:
    rng = random.Random(ps * 2 + prefix_caching)
    num_pages = rng.choice([12, 20, 32])
    max_tokens = num_pages * ps
    m = KVCacheManager(num_pages, ps, enable_prefix_caching=prefix_caching)
    dev = FakeDevice(m)
    bases = [[rng.randrange(40) for _ in range(24)] for _ in range(4)]
    live: dict[int, list[int]] = {}
    parked: list[list[int]] = []  # preempted sequences (prompt + generated), resumed later
    next_id = 0
    hits = cows = forks = evictions_seen = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.3:
            if parked and rng.random() < 0.4:
                tokens = parked.pop(rng.randrange(len(parked)))
            else:
                base = rng.choice(bases)
                tokens = base[:rng.randrange(25)] + [rng.randrange(40) for _ in range(rng.randrange(4))] or [0]
            sid, next_id = next_id, next_id + 1
            if m.can_allocate(tokens):
                cached = m.allocate(sid, tokens)
                assert 0 <= cached < len(tokens)
                assert cached % ps == 0 or cached == len(tokens) - 1
                if not prefix_caching:
                    assert cached == 0
                hits += cached > 0
                live[sid] = tokens
                if rng.random() < 0.5:  # sometimes leave copies pending across later ops
                    cows += len(dev.apply_copies())
                    dev.verify(sid, tokens, cached)
            else:
                before = snapshot(m)
                with pytest.raises(CacheCapacityError):
                    m.allocate(sid, tokens)
                assert snapshot(m) == before
        elif op < 0.7 and live:
            sid = rng.choice(list(live))
            tokens = live[sid]
            done = m.num_computed(sid)
            if done == len(tokens):
                if len(tokens) == max_tokens:  # finished: cannot grow further
                    m.free(sid)
                    del live[sid]
                    m.check_invariants()
                    continue
                tokens.append(rng.randrange(40))  # decode
            n = rng.randint(1, len(tokens) - done)  # chunked prefill or one decode token
            before = snapshot(m)
            free_before = m.num_free_pages
            if not run_step(m, dev, sid, tokens, n):
                assert snapshot(m) == before
                m.free(sid)  # preempt; resume later with prompt + generated
                parked.append(live.pop(sid))
            elif free_before == 0:
                evictions_seen += 1
        elif op < 0.8 and live:
            parent = rng.choice(list(live))
            child, next_id = next_id, next_id + 1
            m.fork(parent, child)
            live[child] = list(live[parent])
            forks += 1
        elif op < 0.95 and live:
            sid = rng.choice(list(live))
            m.free(sid)
            tokens = live.pop(sid)
            if rng.random() < 0.3:
                parked.append(tokens)
        m.check_invariants()
        if step % 20 == 0:
            cows += len(dev.apply_copies())
            for sid, tokens in live.items():
                dev.verify(sid, tokens, m.num_computed(sid))
    for sid in list(live):
        m.free(sid)
        m.check_invariants()
    dev.apply_copies()
    m.check_invariants()
    assert m.all_free()
    assert m.num_free_pages == num_pages and m.num_used_pages == 0
    assert forks > 0
    if prefix_caching:
        assert hits > 0 and m.usage()["prefix_hit_tokens"] > 0
    else:
        assert m.usage()["evictable_pages"] == 0 and m.num_cached_pages == 0


def test_prefix_sharing_saves_pages_and_counts_page_aligned() -> None:
    m = KVCacheManager(16, 4)
    a = list(range(10))
    assert m.allocate("a", a) == 0
    assert m.allocate("early", a[:9] + [99]) == 0  # nothing is cached before a commit
    m.free("early")
    m.commit("a", a, 10)
    m.check_invariants()
    assert m.num_cached_pages == 2  # the partial third page is not cached

    b = a[:9] + [99, 100, 101]
    assert m.allocate("b", b) == 8
    assert m.page_table("b")[:2] == m.page_table("a")[:2]
    assert m.page_table("b")[2] != m.page_table("a")[2]
    assert m.num_used_pages == 4  # 3 for a, 1 new for b
    assert m.allocate("c", a[:7] + [5, 5]) == 4  # one full page matches
    assert m.allocate("d", [7] + a[1:]) == 0  # the chain starts at the first page
    assert m.take_pending_copies() == []
    m.check_invariants()

    plain = KVCacheManager(16, 4, enable_prefix_caching=False)
    plain.allocate("a", a)
    plain.commit("a", a, 10)
    assert plain.allocate("b", b) == 0
    assert plain.num_used_pages == 6
    for sid in ("a", "b"):
        plain.free(sid)
    assert plain.usage()["evictable_pages"] == 0 and plain.all_free()


@pytest.mark.parametrize("owner_alive", [True, False])
def test_full_hit_copy_on_write(owner_alive: bool) -> None:
    m = KVCacheManager(8, 4)
    dev = FakeDevice(m)
    a = list(range(8))
    m.allocate("a", a)
    run_step(m, dev, "a", a, 8)
    pa = m.page_table("a")
    if not owner_alive:
        m.free("a")
        assert m.usage()["evictable_pages"] == 2

    assert m.allocate("b", a) == 7
    pb = m.page_table("b")
    assert pb[0] == pa[0] and pb[1] != pa[1]
    m.check_invariants()
    assert dev.apply_copies() == [(pa[1], pb[1])]
    assert m.take_pending_copies() == []
    dev.verify("b", a, 7)
    assert run_step(m, dev, "b", a, 1)
    assert m.take_pending_copies() == []  # b's last page is already private
    assert m.page_table("b") == pb
    assert m.num_cached_pages == 2  # the private duplicate is not registered
    dev.verify("b", a, 8)
    if owner_alive:
        dev.verify("a", a, 8)
        m.free("a")
    m.free("b")
    m.check_invariants()
    assert m.all_free()


def test_full_hit_with_single_token_pages_needs_no_copy() -> None:
    m = KVCacheManager(4, 1)
    m.allocate("a", [3, 4])
    m.commit("a", [3, 4], 2)
    assert m.allocate("b", [3, 4]) == 1
    assert m.page_table("b")[0] == m.page_table("a")[0]
    assert m.page_table("b")[1] != m.page_table("a")[1]
    assert m.take_pending_copies() == []  # the whole page is rewritten
    m.check_invariants()


def test_fork_then_write_copies_only_the_shared_partial_page() -> None:
    m = KVCacheManager(16, 4)
    dev = FakeDevice(m)
    toks = list(range(10))
    m.allocate("p", toks)
    run_step(m, dev, "p", toks, 10)
    m.fork("p", "c")
    m.check_invariants()
    pp = m.page_table("p")
    assert m.page_table("c") == pp and m.num_computed("c") == 10

    child = toks + [50]
    assert m.ensure_slots("c", 11)
    pc = m.page_table("c")
    assert pc[:2] == pp[:2] and pc[2] != pp[2]
    assert dev.apply_copies() == [(pp[2], pc[2])]
    dev.write("c", child, 10, 11)
    m.commit("c", child, 11)

    parent = toks + [60]
    assert m.ensure_slots("p", 11)  # the partial page is now p's alone: write in place
    assert m.take_pending_copies() == [] and m.page_table("p") == pp
    dev.write("p", parent, 10, 11)
    m.commit("p", parent, 11)
    dev.verify("p", parent, 11)
    dev.verify("c", child, 11)
    m.check_invariants()


def test_fork_at_page_boundary_and_preallocated_page_need_no_copy() -> None:
    m = KVCacheManager(16, 4)
    toks = list(range(8))
    m.allocate("p", toks)
    m.commit("p", toks, 8)
    m.fork("p", "c")
    assert m.ensure_slots("c", 9)  # new page appended, full pages stay shared
    assert m.take_pending_copies() == []
    assert m.page_table("c")[:2] == m.page_table("p")[:2] and m.num_pages_of("c") == 3

    assert m.ensure_slots("p", 9)  # p preallocates its third page ...
    m.fork("p", "q")  # ... which q now shares, but neither has written it yet
    assert m.ensure_slots("q", 10)
    assert m.page_table("q")[2] != m.page_table("p")[2]
    assert m.take_pending_copies() == []  # row 0 onwards is rewritten: nothing to keep
    m.check_invariants()


def test_chained_copies_are_resolved_and_pin_pages_until_taken() -> None:
    m = KVCacheManager(8, 4)
    a = list(range(8))
    m.allocate("a", a)
    m.commit("a", a, 8)
    pa = m.page_table("a")
    assert m.allocate("b", a) == 7  # pending (pa[1] -> pb[1])
    m.fork("b", "c")
    assert m.ensure_slots("c", 8)  # c writes pb[1], itself an unapplied copy of pa[1]
    pb, pc = m.page_table("b"), m.page_table("c")
    for sid in ("a", "b", "c"):
        m.free(sid)
        m.check_invariants()
    assert not m.all_free()
    assert m.num_used_pages == 3  # sources and destinations stay pinned until taken
    assert m.take_pending_copies() == [(pa[1], pb[1]), (pa[1], pc[1])]
    m.check_invariants()
    assert m.all_free()


def test_eviction_is_lru_tail_first_and_prefers_free_pages() -> None:
    m = KVCacheManager(6, 2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    for sid, toks in (("a", a), ("b", b)):
        m.allocate(sid, toks)
        m.commit(sid, toks, 4)
    pa = m.page_table("a")
    m.free("a")
    m.free("b")
    assert m.num_free_pages == 6 and m.usage()["evictable_pages"] == 4

    m.allocate("x", [9, 9, 8, 8, 7, 7])  # 3 pages: 2 free + 1 evicted
    m.check_invariants()
    assert pa[1] in m.page_table("x")  # a's tail page was least recently freed
    assert m.num_cached_pages == 3
    m.free("x")  # x's uncached pages return to the free list
    assert m.allocate("a2", a) == 2  # a's first page survived
    assert m.allocate("b2", b) == 3  # b fully survived: full hit
    m.check_invariants()


def test_capacity_failures_change_nothing() -> None:
    m = KVCacheManager(3, 2)
    a = [1, 2, 3, 4]
    m.allocate("a", a)
    m.commit("a", a, 4)
    m.free("a")
    m.allocate("x", [7, 7])  # takes the only free page; 2 evictable left
    before = snapshot(m)

    with pytest.raises(CacheCapacityError):
        m.allocate("big", list(range(7)))  # 4 pages: never fits
    assert not m.can_allocate([1, 2, 5, 6, 8, 8])  # hit 1 evictable page, needs 2 more: only 1 left
    with pytest.raises(CacheCapacityError):
        m.allocate("y", [1, 2, 5, 6, 8, 8])
    with pytest.raises(CacheCapacityError):
        m.ensure_slots("x", 7)
    assert snapshot(m) == before
    m.allocate("z", [5])  # evicts a cached page; 1 evictable left
    before = snapshot(m)
    assert m.ensure_slots("x", 6) is False  # needs 2 more pages, 1 available
    assert snapshot(m) == before
    assert m.ensure_slots("x", 4) is True
    assert m.num_free_pages == 0 and m.num_cached_pages == 0
    before = snapshot(m)
    assert not m.can_allocate([1])
    with pytest.raises(CacheCapacityError):
        m.allocate("w", [1])
    assert m.ensure_slots("z", 3) is False
    assert snapshot(m) == before
    m.check_invariants()

    m2 = KVCacheManager(3, 2)
    m2.allocate("a", a)
    m2.commit("a", a, 4)
    m2.free("a")
    m2.allocate("x", [7, 7])
    assert m2.can_allocate([1, 2, 5, 6])  # hit counts: 1 held + 1 new out of 2 evictable
    assert m2.allocate("y", [1, 2, 5, 6]) == 2
    m2.check_invariants()


def test_ensure_slots_false_when_copy_on_write_lacks_a_page() -> None:
    m = KVCacheManager(3, 4)
    toks = [1, 2, 3, 4, 5, 6]
    m.allocate("p", toks)
    m.commit("p", toks, 6)
    m.fork("p", "c")
    m.allocate("filler", [9])  # the last free page
    before = snapshot(m)
    assert m.ensure_slots("c", 7) is False  # would need a private copy of page 1
    assert snapshot(m) == before
    m.free("filler")
    assert m.ensure_slots("c", 7) is True
    assert len(m.take_pending_copies()) == 1
    m.check_invariants()


def test_commit_registers_only_full_pages_as_they_fill() -> None:
    m = KVCacheManager(8, 4)
    toks = [1, 2, 3, 4, 5, 6]
    m.allocate("a", toks)
    m.commit("a", toks, 6)
    assert m.num_cached_pages == 1
    for t in (7, 8):
        toks.append(t)
        assert m.ensure_slots("a", len(toks))
        m.commit("a", toks, len(toks))
    assert m.num_cached_pages == 2
    assert m.allocate("b", toks + [9]) == 8
    m.check_invariants()


def test_rewriting_a_cached_page_copies_it_first() -> None:
    m = KVCacheManager(8, 4)
    toks = list(range(8))
    m.allocate("a", toks)
    m.commit("a", toks, 8)
    old = m.page_table("a")[1]
    assert m.prepare_write("a", 6, 2)  # rollback-style rewrite of rows 2..3 of a cached page
    new = m.page_table("a")[1]
    assert new != old
    assert m.take_pending_copies() == [(old, new)]
    assert m.allocate("b", toks) == 7  # the cached original is still served
    m.check_invariants()


def test_slot_and_page_table() -> None:
    m = KVCacheManager(8, 4)
    m.allocate("a", list(range(6)))
    pages = m.page_table("a")
    assert m.slot("a", 5) == pages[1] * 4 + 1
    assert m.num_pages_of("a") == 2
    with pytest.raises(IndexError):
        m.slot("a", 8)
    with pytest.raises(KeyError):
        m.page_table("nope")
    with pytest.raises(ValueError):
        m.allocate("a", [1])


def test_check_invariants_detects_corruption() -> None:
    m = KVCacheManager(4, 2)
    m.allocate("a", [1, 2, 3])
    m.check_invariants()
    m._refcount[m.page_table("a")[0]] += 1
    with pytest.raises(AssertionError):
        m.check_invariants()
    m._refcount[m.page_table("a")[0]] -= 1
    m._free.append(m.page_table("a")[1])
    with pytest.raises(AssertionError):
        m.check_invariants()


def test_budget_helpers() -> None:
    assert bytes_per_page(16, 2, 4, 64, 2) == 2 * 2 * 16 * 4 * 64 * 2
    assert pages_for_budget(100_000, 16, 2, 4, 64, 2) == 3
    assert pages_for_budget(0, 16, 2, 4, 64, 2) == 0
    with pytest.raises(ValueError):
        bytes_per_page(0, 2, 4, 64, 2)
