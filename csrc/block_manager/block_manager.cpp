// The block manager; the design, the allocation order and the cache rules are in block_manager.h.
#include "block_manager/block_manager.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <unordered_set>

namespace pagedllm {
namespace {

std::string seq_name(int64_t seq_id) { return "sequence " + std::to_string(seq_id); }

void put_u64_le(Sha256& h, uint64_t v) {
  uint8_t b[8];
  for (int i = 0; i < 8; ++i) b[i] = uint8_t(v >> (8 * i));
  h.update(b, 8);
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::logic_error("block manager invariant violated: " + what);
}

}  // namespace

size_t BlockManager::KeyHasher::operator()(const Digest256& d) const {
  size_t v;
  std::memcpy(&v, d.data(), sizeof(v));  // the digest is uniformly distributed: any 8 bytes do
  return v;
}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching, double watermark,
                           int debug_hash_bits)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      prefix_caching_(enable_prefix_caching),
      debug_hash_bits_(debug_hash_bits) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31 - 1], got " + std::to_string(num_blocks));
  }
  if (block_size <= 0 || block_size > (1 << 20)) {
    throw std::invalid_argument("block_size must be in [1, 2^20], got " + std::to_string(block_size));
  }
  if (!(watermark >= 0.0 && watermark <= 1.0)) {  // also rejects NaN
    throw std::invalid_argument("watermark must be in [0, 1], got " + std::to_string(watermark));
  }
  if (debug_hash_bits < 0 || debug_hash_bits > 256) {
    throw std::invalid_argument("_debug_hash_bits must be in [0, 256], got " + std::to_string(debug_hash_bits));
  }
  watermark_blocks_ = int64_t(watermark * double(num_blocks));  // int() in Python: truncation
  blocks_.resize(size_t(num_blocks));
  if (prefix_caching_) cached_tokens_.resize(size_t(num_blocks * block_size));
  for (int32_t b = 0; b < int32_t(num_blocks); ++b) free_.push_back(b);
}

// ------------------------------------------------------------------------------------------ hashing

Digest256 BlockManager::hash_block(const Digest256* parent, const Salt& salt, const int64_t* tokens, int64_t n) {
  Sha256 h;
  const Digest256 zeros{};
  h.update((parent ? *parent : zeros).data(), 32);
  if (!parent && salt) {
    put_u64_le(h, salt->size());
    h.update(salt->data(), salt->size());
  }
  if constexpr (std::endian::native == std::endian::little) {
    h.update(tokens, size_t(n) * sizeof(int64_t));
  } else {
    for (int64_t i = 0; i < n; ++i) put_u64_le(h, uint64_t(tokens[i]));
  }
  return h.finish();
}

Digest256 BlockManager::truncate(const Digest256& h) const {
  if (debug_hash_bits_ >= 256) return h;
  Digest256 t{};
  const int full = debug_hash_bits_ / 8, rem = debug_hash_bits_ % 8;
  for (int i = 0; i < full; ++i) t[i] = h[i];
  if (rem) t[full] = uint8_t(h[full] & (0xFF00 >> rem));  // keep the top rem bits
  return t;
}

int32_t BlockManager::find_cached(const Digest256& key, const int64_t* tokens, int32_t parent, uint64_t parent_gen,
                                  const Salt& salt) const {
  auto [it, end] = cache_.equal_range(key);
  for (; it != end; ++it) {
    const int32_t c = it->second;
    const Block& b = blocks_[c];
    if (b.parent != parent) continue;
    if (parent >= 0 ? b.parent_gen != parent_gen
                    : (b.has_salt != salt.has_value() || (b.has_salt && b.salt != *salt))) {
      continue;
    }
    if (std::memcmp(&cached_tokens_[size_t(c) * block_size_], tokens, size_t(block_size_) * sizeof(int64_t)) != 0) {
      continue;
    }
    return c;
  }
  return -1;
}

BlockManager::Match BlockManager::match_prefix(TokenSpan tokens, const Salt& salt) const {
  Match m;
  if (!prefix_caching_) return m;
  // At least one token is always computed (the model needs the last token's logits).
  const int64_t max_hits = (int64_t(tokens.size()) - 1) / block_size_;
  int32_t prev = -1;
  uint64_t prev_gen = 0;
  for (int64_t i = 0; i < max_hits; ++i) {
    const int64_t* toks = tokens.data() + i * block_size_;
    m.hashes.push_back(hash_block(i ? &m.hashes.back() : nullptr, salt, toks, block_size_));
    const int32_t c = find_cached(truncate(m.hashes.back()), toks, prev, prev_gen, salt);
    if (c < 0) break;
    m.blocks.push_back(c);
    prev = c;
    prev_gen = blocks_[c].gen;
  }
  return m;
}

void BlockManager::ensure_hashes(Sequence& s, int64_t num_full_blocks) const {
  for (int64_t i = int64_t(s.hashes.size()); i < num_full_blocks; ++i) {
    s.hashes.push_back(hash_block(i ? &s.hashes[size_t(i - 1)] : nullptr, s.salt,
                                  s.tokens.data() + i * block_size_, block_size_));
  }
}

void BlockManager::register_block(Sequence& s, int64_t index) {
  const int32_t b = s.table[size_t(index)];
  Block& blk = blocks_[b];
  if (blk.cached) {  // a prefix hit, or a block shared by fork that another sequence registered
    s.canon_block = b;
    s.canon_gen = blk.gen;
    return;
  }
  const Digest256 key = truncate(s.hashes[size_t(index)]);
  const int64_t* toks = s.tokens.data() + index * block_size_;
  const int32_t parent = index ? s.canon_block : -1;
  const uint64_t parent_gen = index ? s.canon_gen : 0;
  const int32_t existing = find_cached(key, toks, parent, parent_gen, s.salt);
  if (existing >= 0) {  // same content already cached by another block: keep that entry
    s.canon_block = existing;
    s.canon_gen = blocks_[existing].gen;
    return;
  }
  blk.cached = true;
  blk.gen = next_gen_++;
  blk.parent = parent;
  blk.parent_gen = parent_gen;
  blk.key = key;
  blk.has_salt = index == 0 && s.salt.has_value();
  blk.salt = blk.has_salt ? *s.salt : std::string();
  std::memcpy(&cached_tokens_[size_t(b) * block_size_], toks, size_t(block_size_) * sizeof(int64_t));
  cache_.emplace(key, b);
  ++num_cached_;
  s.canon_block = b;
  s.canon_gen = blk.gen;
}

// ------------------------------------------------------------------------------------------ the pool

void BlockManager::lru_push_back(int32_t b) {
  Block& blk = blocks_[b];
  blk.lru_prev = lru_tail_;
  blk.lru_next = -1;
  if (lru_tail_ >= 0) blocks_[lru_tail_].lru_next = b; else lru_head_ = b;
  lru_tail_ = b;
  blk.state = State::kEvictable;
  ++num_evictable_;
}

void BlockManager::lru_remove(int32_t b) {
  Block& blk = blocks_[b];
  if (blk.lru_prev >= 0) blocks_[blk.lru_prev].lru_next = blk.lru_next; else lru_head_ = blk.lru_next;
  if (blk.lru_next >= 0) blocks_[blk.lru_next].lru_prev = blk.lru_prev; else lru_tail_ = blk.lru_prev;
  blk.lru_prev = blk.lru_next = -1;
  --num_evictable_;
}

void BlockManager::uncache(int32_t b) {
  Block& blk = blocks_[b];
  auto [it, end] = cache_.equal_range(blk.key);
  for (; it != end; ++it) {
    if (it->second == b) {
      cache_.erase(it);
      break;
    }
  }
  blk.cached = false;
  blk.has_salt = false;
  blk.salt.clear();
  blk.parent = -1;
  --num_cached_;
  // blk.gen stays: it only changes on the next registration, which makes stale children unreachable.
}

int32_t BlockManager::take_block() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.front();
    free_.pop_front();
  } else {
    b = lru_head_;  // evict the least recently released cached block
    lru_remove(b);
    uncache(b);
  }
  blocks_[b].ref = 1;
  blocks_[b].state = State::kUsed;
  return b;
}

void BlockManager::release(int32_t b) {
  Block& blk = blocks_[b];
  if (--blk.ref > 0) return;
  if (blk.cached) {
    lru_push_back(b);
  } else {
    blk.state = State::kFree;
    free_.push_back(b);
  }
}

const BlockManager::Sequence& BlockManager::seq(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequenceError("unknown " + seq_name(seq_id));
  return it->second;
}

BlockManager::Sequence& BlockManager::seq(int64_t seq_id) {
  return const_cast<Sequence&>(static_cast<const BlockManager*>(this)->seq(seq_id));
}

// ------------------------------------------------------------------------------------------ the API

bool BlockManager::can_allocate(TokenSpan tokens, const Salt& salt) const {
  if (tokens.empty()) throw std::invalid_argument("can_allocate: token_ids is empty");
  const Match m = match_prefix(tokens, salt);
  int64_t needed = blocks_for(int64_t(tokens.size()), block_size_);
  for (int32_t c : m.blocks) needed -= blocks_[c].ref > 0;  // a hit on an EVICTABLE block still costs one
  return num_free_blocks() - needed >= watermark_blocks_;
}

int64_t BlockManager::allocate(int64_t seq_id, TokenSpan tokens, const Salt& salt) {
  if (seqs_.count(seq_id)) throw std::invalid_argument("allocate: " + seq_name(seq_id) + " already exists");
  if (tokens.empty()) throw std::invalid_argument("allocate: token_ids is empty for " + seq_name(seq_id));
  Match m = match_prefix(tokens, salt);
  const int64_t total = blocks_for(int64_t(tokens.size()), block_size_);
  int64_t needed = total;
  for (int32_t c : m.blocks) needed -= blocks_[c].ref > 0;
  if (needed > num_free_blocks()) {
    throw NoFreeBlocksError("allocate(" + seq_name(seq_id) + ", " + std::to_string(tokens.size()) +
                            " tokens): needs " + std::to_string(needed) + " free blocks, only " +
                            std::to_string(num_free_blocks()) + " available");
  }
  Sequence s;
  s.tokens.assign(tokens.begin(), tokens.end());
  s.salt = salt;
  s.table.reserve(size_t(total));
  // Hits first: an EVICTABLE hit leaves the LRU list before fresh blocks may evict from it.
  for (int32_t c : m.blocks) {
    Block& blk = blocks_[c];
    if (blk.ref == 0) lru_remove(c);
    ++blk.ref;
    blk.state = State::kUsed;
    s.table.push_back(c);
  }
  while (int64_t(s.table.size()) < total) s.table.push_back(take_block());
  const int64_t hits = int64_t(m.blocks.size());
  s.hashes = std::move(m.hashes);
  s.num_cached_tokens = s.num_computed_tokens = hits * block_size_;
  s.num_registered = hits;
  if (hits) {
    s.canon_block = s.table[size_t(hits - 1)];
    s.canon_gen = blocks_[s.canon_block].gen;
  }
  seqs_.emplace(seq_id, std::move(s));
  return hits * block_size_;
}

bool BlockManager::can_append(int64_t seq_id, int64_t num_new_tokens) const {
  const Sequence& s = seq(seq_id);
  if (num_new_tokens < 0) throw std::invalid_argument("can_append: num_new_tokens must be >= 0");
  if (num_new_tokens == 0) return true;
  const int64_t n = int64_t(s.tokens.size());
  const bool cow = n % block_size_ != 0 && blocks_[s.table.back()].ref > 1;
  const int64_t needed = blocks_for(n + num_new_tokens, block_size_) - int64_t(s.table.size()) + cow;
  return needed <= num_free_blocks();
}

std::vector<std::pair<int32_t, int32_t>> BlockManager::append_slots(int64_t seq_id, TokenSpan tokens) {
  Sequence& s = seq(seq_id);
  std::vector<std::pair<int32_t, int32_t>> copies;
  if (tokens.empty()) return copies;
  const int64_t n = int64_t(s.tokens.size());
  const bool cow = n % block_size_ != 0 && blocks_[s.table.back()].ref > 1;
  const int64_t total = blocks_for(n + int64_t(tokens.size()), block_size_);
  const int64_t needed = total - int64_t(s.table.size()) + cow;
  if (needed > num_free_blocks()) {
    throw NoFreeBlocksError("append_slots(" + seq_name(seq_id) + ", " + std::to_string(tokens.size()) +
                            " tokens): needs " + std::to_string(needed) + " free blocks, only " +
                            std::to_string(num_free_blocks()) + " available");
  }
  if (cow) {  // the shared partial last block is about to be written: give this sequence its own copy
    const int32_t src = s.table.back();
    const int32_t dst = take_block();
    release(src);  // ref > 1, so src stays USED
    s.table.back() = dst;
    copies.emplace_back(src, dst);
  }
  while (int64_t(s.table.size()) < total) s.table.push_back(take_block());
  s.tokens.insert(s.tokens.end(), tokens.begin(), tokens.end());
  return copies;
}

void BlockManager::mark_computed(int64_t seq_id, int64_t num_computed_tokens) {
  Sequence& s = seq(seq_id);
  if (num_computed_tokens < 0 || num_computed_tokens > int64_t(s.tokens.size())) {
    throw std::invalid_argument("mark_computed: num_computed_tokens " + std::to_string(num_computed_tokens) +
                                " is outside [0, " + std::to_string(s.tokens.size()) + "] for " +
                                seq_name(seq_id));
  }
  if (num_computed_tokens <= s.num_computed_tokens) return;
  s.num_computed_tokens = num_computed_tokens;
  if (!prefix_caching_) return;
  const int64_t full = num_computed_tokens / block_size_;
  ensure_hashes(s, full);
  for (int64_t i = s.num_registered; i < full; ++i) register_block(s, i);
  s.num_registered = std::max(s.num_registered, full);
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Sequence& p = seq(parent_id);
  if (seqs_.count(child_id)) throw std::invalid_argument("fork: " + seq_name(child_id) + " already exists");
  Sequence child = p;  // copy before emplace: emplace may rehash and move p
  for (int32_t b : child.table) ++blocks_[b].ref;
  seqs_.emplace(child_id, std::move(child));
}

void BlockManager::truncate_tokens(int64_t seq_id, int64_t num_tokens) {
  Sequence& s = seq(seq_id);
  if (num_tokens < s.num_computed_tokens || num_tokens > int64_t(s.tokens.size())) {
    throw std::invalid_argument("truncate: num_tokens " + std::to_string(num_tokens) + " is outside [" +
                                std::to_string(s.num_computed_tokens) + ", " + std::to_string(s.tokens.size()) +
                                "] (computed .. reserved) for " + seq_name(seq_id));
  }
  const size_t keep = size_t(blocks_for(num_tokens, block_size_));
  while (s.table.size() > keep) {  // tail first, like free()
    release(s.table.back());
    s.table.pop_back();
  }
  s.tokens.resize(size_t(num_tokens));
  const size_t full = size_t(num_tokens / block_size_);  // hashes of blocks that are no longer full go
  if (s.hashes.size() > full) s.hashes.resize(full);
}

void BlockManager::replace_tokens(int64_t seq_id, int64_t start, TokenSpan tokens) {
  Sequence& s = seq(seq_id);
  const int64_t end = start + int64_t(tokens.size());
  if (start < s.num_computed_tokens || end > int64_t(s.tokens.size())) {
    throw std::invalid_argument("replace_tokens: tokens [" + std::to_string(start) + ", " + std::to_string(end) +
                                ") are outside [" + std::to_string(s.num_computed_tokens) + ", " +
                                std::to_string(s.tokens.size()) + "] (computed .. reserved) for " + seq_name(seq_id));
  }
  std::copy(tokens.begin(), tokens.end(), s.tokens.begin() + start);
  const size_t kept = size_t(start / block_size_);  // hashes of the blocks these tokens fall in go
  if (s.hashes.size() > kept) s.hashes.resize(kept);
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequenceError("unknown " + seq_name(seq_id));
  const std::vector<int32_t>& table = it->second.table;
  for (auto b = table.rbegin(); b != table.rend(); ++b) release(*b);  // tail first
  seqs_.erase(it);
}

bool BlockManager::reset_prefix_cache() {
  while (lru_head_ >= 0) {
    const int32_t b = lru_head_;
    lru_remove(b);
    uncache(b);
    blocks_[b].state = State::kFree;
    free_.push_back(b);
  }
  return num_cached_ == 0;
}

int64_t BlockManager::num_common_prefix_blocks(std::span<const int64_t> seq_ids) const {
  if (seq_ids.empty()) return 0;
  const std::vector<int32_t>& first = seq(seq_ids[0]).table;
  int64_t common = int64_t(first.size());
  for (int64_t id : seq_ids.subspan(1)) {
    const std::vector<int32_t>& t = seq(id).table;
    int64_t i = 0;
    while (i < common && i < int64_t(t.size()) && t[size_t(i)] == first[size_t(i)]) ++i;
    common = i;
  }
  return common;
}

int32_t BlockManager::ref_count(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::invalid_argument("block id " + std::to_string(block_id) + " is outside [0, " +
                                std::to_string(num_blocks_) + ")");
  }
  return blocks_[size_t(block_id)].ref;
}

std::vector<int32_t> BlockManager::debug_evictable() const {
  std::vector<int32_t> out;
  for (int32_t b = lru_head_; b >= 0; b = blocks_[b].lru_next) out.push_back(b);
  return out;
}

void BlockManager::check_invariants() const {
  const auto name = [](int32_t b) { return "block " + std::to_string(b); };
  // Ref counts equal the number of block-table entries naming the block; tables have the right length.
  std::vector<int64_t> refs(size_t(num_blocks_), 0);
  for (const auto& [id, s] : seqs_) {
    check(!s.tokens.empty(), seq_name(id) + " has no tokens");
    check(int64_t(s.table.size()) == blocks_for(int64_t(s.tokens.size()), block_size_),
          seq_name(id) + " table length != ceil(tokens / block_size)");
    check(s.num_computed_tokens <= int64_t(s.tokens.size()), seq_name(id) + " computed > tokens");
    check(s.num_cached_tokens <= int64_t(s.tokens.size()) - 1, seq_name(id) + " cached the last token");
    check(s.num_registered * block_size_ <= s.num_computed_tokens, seq_name(id) + " registered uncomputed blocks");
    std::unordered_set<int32_t> seen;
    for (int32_t b : s.table) {
      check(b >= 0 && b < num_blocks_, seq_name(id) + " holds an invalid block id");
      check(seen.insert(b).second, seq_name(id) + " holds " + name(b) + " twice");
      ++refs[size_t(b)];
    }
  }
  int64_t n_free = 0, n_evictable = 0, n_cached = 0;
  for (int32_t b = 0; b < num_blocks_; ++b) {
    const Block& blk = blocks_[size_t(b)];
    check(blk.ref == refs[size_t(b)], name(b) + " ref count " + std::to_string(blk.ref) + " != " +
                                          std::to_string(refs[size_t(b)]) + " table entries");
    const State want = blk.ref > 0 ? State::kUsed : blk.cached ? State::kEvictable : State::kFree;
    check(blk.state == want, name(b) + " is in the wrong state");
    n_free += blk.state == State::kFree;
    n_evictable += blk.state == State::kEvictable;
    n_cached += blk.cached;
    check(prefix_caching_ || !blk.cached, name(b) + " cached with prefix caching off");
  }
  // The free list holds exactly the FREE blocks, once each.
  std::unordered_set<int32_t> in_free;
  for (int32_t b : free_) {
    check(b >= 0 && b < num_blocks_ && blocks_[size_t(b)].state == State::kFree, name(b) + " on the free list");
    check(in_free.insert(b).second, name(b) + " twice on the free list");
  }
  check(int64_t(free_.size()) == n_free, "free list length");
  // The LRU list holds exactly the EVICTABLE blocks, correctly linked.
  int64_t walked = 0;
  for (int32_t b = lru_head_, prev = -1; b >= 0; prev = b, b = blocks_[size_t(b)].lru_next) {
    check(blocks_[size_t(b)].state == State::kEvictable, name(b) + " on the LRU list");
    check(blocks_[size_t(b)].lru_prev == prev, "LRU back link of " + name(b));
    check(++walked <= num_blocks_, "LRU list cycle");
    if (blocks_[size_t(b)].lru_next < 0) check(lru_tail_ == b, "LRU tail");
  }
  check(walked == n_evictable && num_evictable_ == n_evictable, "evictable count");
  // The cache map holds exactly the cached blocks under their keys; verified-equal duplicates never coexist.
  check(num_cached_ == n_cached && int64_t(cache_.size()) == n_cached, "cached count");
  for (const auto& [key, b] : cache_) {
    const Block& blk = blocks_[size_t(b)];
    check(blk.cached && blk.key == key, name(b) + " cache entry");
    check(blk.gen > blk.parent_gen, name(b) + " registered before its parent");
    check(find_cached(key, &cached_tokens_[size_t(b) * block_size_], blk.parent, blk.parent_gen,
                      blk.has_salt ? Salt(blk.salt) : Salt()) == b,
          name(b) + " has a verified-equal twin in the cache");
  }
}

}  // namespace pagedllm
