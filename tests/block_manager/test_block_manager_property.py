"""A hypothesis state machine drives pagedllm._C.BlockManager with random allocate / append / mark_computed /
fork / free / reset_prefix_cache calls and checks it against a small Python model of the pool and of the
KV cache itself.

The model simulates the KV a caller would write: slot (block, offset) holds the identity of the token that
produced it, (salt, the token ids up to and including it). Whatever the hashes do (the machine also runs
with hash keys truncated to 0 or 3 bits, so they collide constantly), every sequence must read back its own
KV for every token it has computed, and a prefix hit must hand out blocks that already hold exactly the
new prompt's KV. On top of that: ref counts equal the block-table entries, free + evictable + used blocks
partition the pool, tables hold ceil(tokens / block_size) blocks, a shared block sits at the same index
with the same salt and token prefix in every table, can_allocate / can_append agree with the model, a
failed call changes nothing, and freeing everything leaves zero blocks in use.
"""
import pytest
import torch  # noqa: F401 - _C links torch: import it first
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedllm import _C

TOKENS = st.integers(0, 2)                     # a tiny alphabet, so prompts share prefixes all the time
SALTS = st.sampled_from([None, b"a", b"b"])
MAX_SEQS = 10
MAX_TOKENS = 40


def cdiv(a, b):
    return -(-a // b)


class BlockPoolMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]),
                caching=st.booleans(), bits=st.sampled_from([0, 3, 256]),
                watermark=st.sampled_from([0.0, 0.1, 0.25]))
    def setup(self, num_blocks, block_size, caching, bits, watermark):
        self.bm = _C.BlockManager(num_blocks, block_size, caching, watermark, _debug_hash_bits=bits)
        self.n, self.bs, self.caching = num_blocks, block_size, caching
        self.wm = int(watermark * num_blocks)
        self.seqs = {}      # seq id -> {"tokens", "salt", "computed", "table"}
        self.kv = {}        # block id -> [slot content or None] * block_size
        self.next_id = 0

    # ------------------------------------------------------------------ model helpers

    def content(self, s, p):
        return (s["salt"], tuple(s["tokens"][: p + 1]))

    def refs(self):
        refs = {}
        for s in self.seqs.values():
            for b in s["table"]:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def snapshot(self):
        bm = self.bm
        return (bm._free_list(), bm._evictable(), [bm.ref_count(b) for b in range(self.n)],
                {sid: bm.get_block_table(sid) for sid in self.seqs}, bm.num_cached_blocks)

    def new_tokens(self, data, lo, hi):
        return data.draw(st.lists(TOKENS, min_size=lo, max_size=hi))

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: len(self.seqs) < MAX_SEQS)
    @rule(data=st.data(), salt=SALTS)
    def allocate(self, data, salt):
        bm, bs = self.bm, self.bs
        tokens = self.new_tokens(data, 1, 3 * bs + 2)
        sid, self.next_id = self.next_id, self.next_id + 1
        can = bm.can_allocate(tokens, salt)
        before = self.snapshot()
        free = bm.num_free_blocks
        try:
            cached = bm.allocate(sid, tokens, salt)
        except _C.NoFreeBlocksError:
            assert not can and cdiv(len(tokens), bs) > free     # prefix hits only ever lower the need
            assert self.snapshot() == before and not bm.has_seq(sid)
            return
        table = bm.get_block_table(sid)
        assert len(table) == cdiv(len(tokens), bs)
        assert cached % bs == 0 and cached <= (len(tokens) - 1) // bs * bs
        if not self.caching:
            assert cached == 0
        old_refs = before[2]
        taken = sum(old_refs[b] == 0 for b in table)          # fresh blocks and hits on evictable blocks
        assert all(old_refs[b] == 0 for b in table[cached // bs:])  # non-hit blocks were free
        assert bm.num_free_blocks == free - taken
        assert can == (free - taken >= self.wm)
        s = {"tokens": list(tokens), "salt": salt, "computed": cached, "table": table}
        for p in range(cached):                               # a hit hands out exactly this prompt's KV
            assert self.kv[table[p // bs]][p % bs] == self.content(s, p)
        assert bm.num_cached_tokens(sid) == bm.num_computed_tokens(sid) == cached
        self.seqs[sid] = s

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def append(self, data):
        bm, bs = self.bm, self.bs
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        s = self.seqs[sid]
        new = self.new_tokens(data, 0, bs + 1)
        new = new[: max(0, MAX_TOKENS - len(s["tokens"]))]
        n, table = len(s["tokens"]), s["table"]
        refs = self.refs()
        cow = bool(new) and n % bs != 0 and refs[table[-1]] > 1
        needed = cdiv(n + len(new), bs) - len(table) + cow
        free = bm.num_free_blocks
        assert bm.can_append(sid, len(new)) == (needed <= free)
        before = self.snapshot()
        try:
            copies = bm.append_slots(sid, new)
        except _C.NoFreeBlocksError:
            assert needed > free and self.snapshot() == before
            return
        assert needed <= free and bm.num_free_blocks == free - needed
        new_table = bm.get_block_table(sid)
        assert len(new_table) == cdiv(n + len(new), bs)
        kept = len(table) - 1 if cow else len(table)
        assert new_table[:kept] == table[:kept]
        assert all(before[2][b] == 0 for b in new_table[kept:])
        if cow:
            src, dst = table[-1], new_table[len(table) - 1]
            assert copies == [(src, dst)]
            self.kv[dst] = list(self.kv.get(src, [None] * bs))  # the copy the caller must do
        else:
            assert copies == []
        s["tokens"] += new
        s["table"] = new_table
        assert bm.num_tokens(sid) == len(s["tokens"])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def mark_computed(self, data):
        bm, bs = self.bm, self.bs
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        s = self.seqs[sid]
        upto = data.draw(st.integers(0, len(s["tokens"])))     # below the current count: a no-op
        for p in range(s["computed"], upto):                   # the caller writes the KV, then reports it
            self.kv.setdefault(s["table"][p // bs], [None] * bs)[p % bs] = self.content(s, p)
        bm.mark_computed(sid, upto)
        s["computed"] = max(s["computed"], upto)
        assert bm.num_computed_tokens(sid) == s["computed"]

    @precondition(lambda self: self.seqs and len(self.seqs) < MAX_SEQS)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.seqs)))
        child, self.next_id = self.next_id, self.next_id + 1
        free = self.bm.num_free_blocks
        self.bm.fork(parent, child)
        p = self.seqs[parent]
        self.seqs[child] = {"tokens": list(p["tokens"]), "salt": p["salt"], "computed": p["computed"],
                            "table": list(p["table"])}
        assert self.bm.get_block_table(child) == p["table"] and self.bm.num_free_blocks == free

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]
        with pytest.raises(KeyError):
            self.bm.free(sid)

    @rule()
    def reset_prefix_cache(self):
        assert self.bm.reset_prefix_cache() == (self.bm.num_cached_blocks == 0)
        assert self.bm._evictable() == []

    # ------------------------------------------------------------------ invariants

    @invariant()
    def pool_matches_model(self):
        bm, bs = self.bm, self.bs
        bm._check_invariants()
        refs = self.refs()
        assert [bm.ref_count(b) for b in range(self.n)] == [refs.get(b, 0) for b in range(self.n)]
        free_list, evictable = bm._free_list(), bm._evictable()
        assert len(set(free_list) | set(evictable) | set(refs)) == len(free_list) + len(evictable) + len(refs) == self.n
        assert bm.num_used_blocks == len(refs) and bm.num_free_blocks == self.n - len(refs)
        assert bm.num_seqs == len(self.seqs)
        if not self.caching:
            assert bm.num_cached_blocks == 0 and evictable == []
        holder = {}
        for sid, s in self.seqs.items():
            n, table = len(s["tokens"]), s["table"]
            assert bm.get_block_table(sid) == table and len(table) == cdiv(n, bs)
            assert bm.num_tokens(sid) == n
            for p in range(s["computed"]):                       # every computed token reads its own KV
                assert self.kv[table[p // bs]][p % bs] == self.content(s, p)
            for i, b in enumerate(table):                        # sharing only with identical prefixes
                key = (i, s["salt"], tuple(s["tokens"][: min(n, (i + 1) * bs)]))
                assert holder.setdefault(b, key) == key

    def teardown(self):
        if getattr(self, "bm", None) is None:
            return
        for sid in sorted(self.seqs):
            self.bm.free(sid)
        self.seqs.clear()
        assert self.bm.num_used_blocks == 0 and self.bm.num_free_blocks == self.n
        assert all(self.bm.ref_count(b) == 0 for b in range(self.n))
        self.bm._check_invariants()


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
