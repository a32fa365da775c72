// SHA-256 (FIPS 180-4), std-only. Used by the block manager for the chained prefix-cache hashes;
// tests compare it with Python's hashlib through pagedllm._C._sha256_hex.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace pagedllm {

using Digest256 = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256() { reset(); }
  void reset();
  // Feeds n bytes; may be called any number of times before finish().
  void update(const void* data, size_t n);
  // Pads, returns the digest. The object must be reset() before it is used again.
  Digest256 finish();

  static Digest256 digest(const void* data, size_t n) {
    Sha256 h;
    h.update(data, n);
    return h.finish();
  }

 private:
  void compress(const uint8_t* block);  // one 64-byte block

  uint32_t state_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;   // bytes waiting in buf_ (< 64)
  uint64_t total_ = 0;   // bytes fed so far
};

std::string to_hex(const Digest256& d);

}  // namespace pagedllm
