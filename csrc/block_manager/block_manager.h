// The KV-cache block manager: a fixed pool of KV blocks, ref counts, prefix caching with verified chained
// hashes, LRU eviction of unreferenced cached blocks, fork and copy-on-write. std-only C++ (no torch, no
// CUDA, no pybind11: bindings.cpp is the only file that sees Python). The scheduler drives it the way vLLM's
// scheduler drives its block manager; it knows nothing of tensors: the caller performs the KV copies it
// returns and writes the KV of the slots it hands out (slot = block_id * block_size + offset).
//
// ---------------------------------------------------------------------------------------------------------
// Sequences. Each sequence (int64 id) holds
//   - tokens: the token ids whose KV slots are reserved (prompt + appended tokens), token p lives in
//     block table[p / block_size] at offset p % block_size; table.size() == ceil(tokens / block_size);
//   - an optional salt (bytes; a Python str is taken as its UTF-8 bytes), mixed into the first block's hash
//     and compared on every hit, so requests with different salts never share a block (None and b"" differ);
//   - num_cached_tokens: the tokens whose KV came from the prefix cache at allocate();
//   - num_computed_tokens: the prefix whose KV the caller has reported written (mark_computed).
//
// Block states. ref > 0: USED (in some block table). ref == 0 and cached: EVICTABLE (still in the prefix
// cache, on the LRU list, can be hit or evicted). ref == 0, not cached: FREE (on the free list).
// num_free_blocks() = FREE + EVICTABLE; num_used_blocks() = USED; num_cached_blocks() = blocks in the
// prefix cache (USED or EVICTABLE).
//
// Allocation order (exact, tests pin it). A new block is taken
//   1. from the front of the free list. The free list is FIFO: initially 0, 1, ..., num_blocks-1; a block
//      that becomes FREE is appended at the back;
//   2. when the free list is empty, by evicting the least recently released EVICTABLE block (the front of
//      the LRU list; released blocks are appended at its back), whose prefix-cache entry is dropped.
// Releasing (free) walks a sequence's block table from the tail to the head, so a sequence's later blocks
// are evicted before its earlier ones (a child block is useless without its parent, and common prefixes
// are kept longest). A prefix hit on an EVICTABLE block takes it off the LRU list (ref 1).
//
// Prefix caching. The hash of full block i of a sequence is chained:
//     h_i = SHA-256( h_{i-1} (32 bytes; 32 zero bytes for i = 0)
//                    || [i = 0 and a salt is given: len(salt) as u64 LE || salt]
//                    || the block's block_size token ids, each int64 little-endian ).
// Only full blocks whose KV is computed are ever cached: mark_computed(seq, n) registers the full blocks
// within the first n tokens, so a request admitted while another one with the same prompt is still
// prefilling never reads KV that has not been written. If a verified-equal entry already exists
// (same content computed twice, e.g. by two concurrent identical prompts), the existing entry is kept
// and the new block stays uncached (it is freed, not kept, when released).
// A hit is never trusted to the hash alone. Each cached block stores its token ids, its salt (first
// blocks) and its parent: the cached block that holds the previous block's content, as (block id,
// registration generation). Lookup walks the prompt's blocks in order and block i hits cached block c
// only if c's hash key matches AND c's tokens equal block i's tokens AND c's parent is exactly the block
// matched for i-1 with the generation it has now (for i = 0: c is a first block with the same salt).
// Every registration gets a fresh generation number, so a parent that was evicted and re-registered with
// other content never validates a stale child. Hence two different prompts can never share a block even
// if every hash collides (the `debug_hash_bits` constructor argument truncates the hash keys to k bits,
// 0 = all equal, to test exactly that; equal keys then share a bucket and are told apart by verification).
//
// Hit cap. The model needs the logits of the last prompt token, so at least one token is always computed:
// at most (len(tokens) - 1) / block_size full blocks (integer division) can hit. For a prompt whose
// length is a multiple of block_size this stops before the last block (the one holding the last token);
// e.g. block_size 16: 32 tokens -> at most 1 block (16 cached tokens), 33 tokens -> at most 2 (32).
// Lookup stops at the first miss: num_cached_tokens = block_size * (number of leading hits).
//
// Admission and the watermark (as vLLM v0). watermark_blocks = int(watermark * num_blocks).
// can_allocate(tokens) is true when num_free_blocks() - needed >= watermark_blocks, where needed =
// ceil(len / block_size) minus the hits on USED blocks (a hit on an EVICTABLE block leaves the free pool,
// so it costs a block like a fresh one). allocate() itself only fails when the blocks are truly not
// there (needed > num_free_blocks()): the watermark is an admission policy that keeps room for running
// sequences to grow, which is also why can_append() and append_slots() ignore it.
//
// Fork and copy-on-write. fork(parent, child) gives the child the parent's table (every block ref++),
// tokens, salt and counters. Full blocks are immutable, so sharing them is free. Before append_slots
// writes into a partial last block that is shared (ref > 1), it copies it: a fresh block dst replaces it
// in this sequence's table, src loses a ref, and (src, dst) is returned: the caller must copy the KV of
// block src into block dst before writing the new tokens. At most one copy per call.
//
// Failure is all-or-nothing: every check (unknown or existing sequence, bad argument, not enough blocks)
// happens before any state changes. Errors: UnknownSequenceError (KeyError in Python), NoFreeBlocksError
// (pagedllm._C.NoFreeBlocksError, a RuntimeError), std::invalid_argument (ValueError).
//
// Cost. append_slots / can_append are O(new tokens) (+ one block copy decision); mark_computed hashes only
// the blocks that became full since the last call (O(block_size) each); allocate / can_allocate hash at
// most (leading hits + 1) blocks plus O(prompt) copying; free is O(blocks of the sequence). Nothing scans
// the pool. Not thread-safe: call from one thread (the Python bindings hold the GIL).
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_manager/sha256.h"

namespace pagedllm {

// Not enough free (free + evictable) blocks for the request. Python: pagedllm._C.NoFreeBlocksError.
class NoFreeBlocksError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A sequence id that was never allocated or is already freed. Python: KeyError("unknown sequence 7").
class UnknownSequenceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using TokenSpan = std::span<const int64_t>;
using Salt = std::optional<std::string>;

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching = true,
               double watermark = 0.01, int debug_hash_bits = 256);

  // Whether allocate(tokens, salt) would succeed with watermark_blocks left free afterwards.
  bool can_allocate(TokenSpan tokens, const Salt& salt = std::nullopt) const;
  // Reserves slots for all tokens; returns num_cached_tokens (the prefix-cache hit length).
  int64_t allocate(int64_t seq_id, TokenSpan tokens, const Salt& salt = std::nullopt);
  // Whether append_slots with num_new_tokens tokens would succeed (copy-on-write block included).
  bool can_append(int64_t seq_id, int64_t num_new_tokens = 1) const;
  // Reserves slots for the new tokens; returns the (src, dst) block copies the caller must do first.
  std::vector<std::pair<int32_t, int32_t>> append_slots(int64_t seq_id, TokenSpan tokens);
  // The KV of the first n tokens is written: caches the full blocks in that prefix. Never decreases.
  void mark_computed(int64_t seq_id, int64_t num_computed_tokens);
  void fork(int64_t parent_id, int64_t child_id);
  // Drops the slots of the tokens from num_tokens on (speculative decoding's rejected drafts): blocks left
  // empty are released tail first, as free() does. num_tokens must not be below num_computed_tokens (a
  // computed prefix may already be cached), so the cache never holds a dropped token.
  void truncate_tokens(int64_t seq_id, int64_t num_tokens);
  // Sets the token ids of slots [start, start + tokens.size()) that append_slots reserved: multi-step decoding
  // (engine/multi_step.py) reserves a few steps' slots before their tokens are sampled. start must not be below
  // num_computed_tokens (a computed prefix may already be cached), so no cached block ever changes.
  void replace_tokens(int64_t seq_id, int64_t start, TokenSpan tokens);
  void free(int64_t seq_id);
  // Drops every EVICTABLE cache entry (those blocks join the free list in LRU order). Returns true when
  // the prefix cache is now empty, false when cached blocks still used by sequences remain cached.
  bool reset_prefix_cache();

  const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).table; }
  int64_t num_tokens(int64_t seq_id) const { return int64_t(seq(seq_id).tokens.size()); }
  int64_t num_cached_tokens(int64_t seq_id) const { return seq(seq_id).num_cached_tokens; }
  int64_t num_computed_tokens(int64_t seq_id) const { return seq(seq_id).num_computed_tokens; }
  const Salt& salt(int64_t seq_id) const { return seq(seq_id).salt; }
  bool has_seq(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  // Leading blocks that all the given sequences share (same block id at the same index).
  int64_t num_common_prefix_blocks(std::span<const int64_t> seq_ids) const;

  int32_t ref_count(int64_t block_id) const;
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t watermark_blocks() const { return watermark_blocks_; }
  bool enable_prefix_caching() const { return prefix_caching_; }
  int64_t num_free_blocks() const { return int64_t(free_.size()) + num_evictable_; }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  int64_t num_cached_blocks() const { return num_cached_; }
  int64_t num_seqs() const { return int64_t(seqs_.size()); }
  double usage() const { return double(num_used_blocks()) / double(num_blocks_); }

  // Test hooks: the free list front to back, the evictable blocks least recently released first, and a
  // full consistency check of the internal structures (throws std::logic_error naming the violation).
  std::vector<int32_t> debug_free_list() const { return {free_.begin(), free_.end()}; }
  std::vector<int32_t> debug_evictable() const;
  void check_invariants() const;

  // The chained block hash described above (exposed for tests).
  static Digest256 hash_block(const Digest256* parent, const Salt& salt, const int64_t* tokens, int64_t n);

 private:
  enum class State : uint8_t { kFree, kEvictable, kUsed };

  struct Block {
    int32_t ref = 0;
    State state = State::kFree;
    bool cached = false;      // has an entry in cache_ (then its tokens are in cached_tokens_)
    bool has_salt = false;    // first blocks only
    int32_t parent = -1;      // cached block holding the previous block's content; -1 for a first block
    uint64_t parent_gen = 0;  // parent's generation when this block was registered
    uint64_t gen = 0;         // this block's registration generation (unique per registration)
    int32_t lru_prev = -1, lru_next = -1;  // LRU links while EVICTABLE
    Digest256 key{};          // cache_ key (the truncated hash) while cached
    std::string salt;
  };

  struct Sequence {
    std::vector<int64_t> tokens;
    std::vector<int32_t> table;
    Salt salt;
    std::vector<Digest256> hashes;   // full chained hashes of full blocks [0, hashes.size())
    int64_t num_cached_tokens = 0;
    int64_t num_computed_tokens = 0;
    int64_t num_registered = 0;      // full blocks [0, n) already offered to the cache
    int32_t canon_block = -1;        // cached block holding block num_registered-1's content ...
    uint64_t canon_gen = 0;          // ... and its generation then (the parent of the next registration)
  };

  struct KeyHasher {
    size_t operator()(const Digest256& d) const;
  };

  struct Match {
    std::vector<int32_t> blocks;       // leading hits
    std::vector<Digest256> hashes;     // chained hashes computed on the way (hits + the first miss)
  };

  const Sequence& seq(int64_t seq_id) const;
  Sequence& seq(int64_t seq_id);
  Digest256 truncate(const Digest256& h) const;
  // The cached block whose content is verified equal: tokens, parent (id and generation) or salt.
  int32_t find_cached(const Digest256& key, const int64_t* tokens, int32_t parent, uint64_t parent_gen,
                      const Salt& salt) const;
  Match match_prefix(TokenSpan tokens, const Salt& salt) const;
  void ensure_hashes(Sequence& s, int64_t num_full_blocks) const;
  void register_block(Sequence& s, int64_t index);
  int32_t take_block();        // precondition: num_free_blocks() > 0
  void release(int32_t block);
  void uncache(int32_t block);
  void lru_push_back(int32_t block);
  void lru_remove(int32_t block);
  static int64_t blocks_for(int64_t num_tokens, int64_t block_size) {
    return (num_tokens + block_size - 1) / block_size;
  }

  int64_t num_blocks_;
  int64_t block_size_;
  bool prefix_caching_;
  int64_t watermark_blocks_;
  int debug_hash_bits_;

  std::vector<Block> blocks_;
  std::vector<int64_t> cached_tokens_;  // [num_blocks, block_size]: token ids of each cached block
  std::deque<int32_t> free_;            // FIFO free list
  int32_t lru_head_ = -1, lru_tail_ = -1;  // least / most recently released EVICTABLE block
  int64_t num_evictable_ = 0;
  int64_t num_cached_ = 0;
  uint64_t next_gen_ = 1;
  std::unordered_multimap<Digest256, int32_t, KeyHasher> cache_;
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace pagedllm
