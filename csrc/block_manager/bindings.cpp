// pagedllm._C.BlockManager: the pybind11 face of block_manager.h (read its header comment for the design).
// This is the only block-manager file that sees Python. Exceptions: UnknownSequenceError -> KeyError,
// NoFreeBlocksError -> pagedllm._C.NoFreeBlocksError (a RuntimeError), std::invalid_argument -> ValueError,
// bad argument types -> TypeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "block_manager/block_manager.h"
#include "block_manager/sha256.h"

namespace py = pybind11;

namespace pagedllm {
namespace {

// Token ids from a 1-D integer numpy array (viewed in place when it is already contiguous int64) or from
// any sequence of Python ints (read with PyLong_AsLongLong, so numpy integer scalars work too).
class Tokens {
 public:
  explicit Tokens(const py::handle& obj) {
    if (py::isinstance<py::array>(obj)) {
      const auto a = py::reinterpret_borrow<py::array>(obj);
      if (a.ndim() != 1) {
        throw py::value_error("token_ids must be 1-D, got an array with " + std::to_string(a.ndim()) + " dims");
      }
      const char kind = a.dtype().kind();
      if (kind != 'i' && kind != 'u') {
        throw py::type_error("token_ids must hold integers, got dtype " + std::string(py::str(a.dtype())));
      }
      arr_ = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
      if (!arr_) throw py::error_already_set();
      span_ = TokenSpan(arr_.data(), size_t(arr_.size()));
      return;
    }
    if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj)) {
      throw py::type_error("token_ids must be a sequence of ints or a 1-D integer numpy array, got str/bytes");
    }
    PyObject* fast = PySequence_Fast(obj.ptr(), "token_ids must be a sequence of ints or a 1-D integer numpy array");
    if (!fast) throw py::error_already_set();
    const auto keep = py::reinterpret_steal<py::object>(fast);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject** items = PySequence_Fast_ITEMS(fast);
    vec_.resize(size_t(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      const long long v = PyLong_AsLongLong(items[i]);  // calls __index__; floats raise TypeError
      if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
      vec_[size_t(i)] = int64_t(v);
    }
    span_ = TokenSpan(vec_.data(), vec_.size());
  }
  TokenSpan span() const { return span_; }

 private:
  py::array_t<int64_t, py::array::c_style | py::array::forcecast> arr_;
  std::vector<int64_t> vec_;
  TokenSpan span_;
};

// None -> no salt; bytes as they are; str as its UTF-8 bytes.
Salt to_salt(const py::handle& obj) {
  if (obj.is_none()) return std::nullopt;
  if (py::isinstance<py::bytes>(obj)) return std::string(py::reinterpret_borrow<py::bytes>(obj));
  if (py::isinstance<py::str>(obj)) return obj.cast<std::string>();
  throw py::type_error("salt must be None, bytes or str, got " + std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
}

std::string to_string(const py::bytes& b) { return std::string(b); }

}  // namespace

void bind_block_manager(py::module_& m) {
  py::register_local_exception<NoFreeBlocksError>(m, "NoFreeBlocksError", PyExc_RuntimeError);
  m.attr("NoFreeBlocksError").attr("__doc__") =
      "Not enough free (free + evictable) KV blocks; the message names the blocks needed and available.";
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const UnknownSequenceError& e) {
      py::set_error(PyExc_KeyError, e.what());
    }
  });

  m.def(
      "_sha256_hex", [](const py::bytes& data) {
        const std::string s = to_string(data);
        return to_hex(Sha256::digest(s.data(), s.size()));
      },
      py::arg("data"), "SHA-256 of data as a hex string (the block manager's own implementation; for tests).");
  m.def(
      "_block_hash",
      [](const py::object& parent, const py::object& salt, const py::object& token_ids) {
        Digest256 p{};
        if (!parent.is_none()) {
          const std::string s = to_string(parent.cast<py::bytes>());
          if (s.size() != 32) throw py::value_error("parent hash must be 32 bytes");
          std::copy(s.begin(), s.end(), p.begin());
        }
        const Tokens t(token_ids);
        const Digest256 h = BlockManager::hash_block(parent.is_none() ? nullptr : &p, to_salt(salt),
                                                     t.span().data(), int64_t(t.span().size()));
        return py::bytes(reinterpret_cast<const char*>(h.data()), h.size());
      },
      py::arg("parent"), py::arg("salt"), py::arg("token_ids"),
      "The chained block hash (32 bytes) of block_manager.h: parent None for a first block; for tests.");

  py::class_<BlockManager>(m, "BlockManager", R"doc(
A fixed pool of KV-cache blocks with ref counts, prefix caching (verified chained SHA-256 block hashes,
LRU eviction of unreferenced cached blocks), fork and copy-on-write. The design, the exact allocation
order and the prefix-cache rules are documented in csrc/block_manager/block_manager.h.

BlockManager(num_blocks, block_size, enable_prefix_caching=True, watermark=0.01, *, _debug_hash_bits=256)
watermark_blocks = int(watermark * num_blocks) stay free after can_allocate() admits a prompt.
_debug_hash_bits (tests only) truncates the hash keys to that many bits (0: every block collides).

token_ids: a list of ints or a 1-D integer numpy array. salt: None, bytes or str (UTF-8).
Errors: unknown sequence -> KeyError; not enough blocks -> NoFreeBlocksError (state unchanged);
bad arguments -> ValueError / TypeError.)doc")
      .def(py::init<int64_t, int64_t, bool, double, int>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true, py::arg("watermark") = 0.01, py::kw_only(),
           py::arg("_debug_hash_bits") = 256)
      .def(
          "can_allocate",
          [](const BlockManager& bm, const py::object& token_ids, const py::object& salt) {
            const Tokens t(token_ids);
            return bm.can_allocate(t.span(), to_salt(salt));
          },
          py::arg("token_ids"), py::arg("salt") = py::none(),
          "Whether allocate() would succeed with watermark_blocks free afterwards (prefix hits on blocks in use "
          "are free; hits on evictable blocks cost a block). A prompt needing more than num_blocks - "
          "watermark_blocks blocks never fits.")
      .def(
          "allocate",
          [](BlockManager& bm, int64_t seq_id, const py::object& token_ids, const py::object& salt) {
            const Tokens t(token_ids);
            return bm.allocate(seq_id, t.span(), to_salt(salt));
          },
          py::arg("seq_id"), py::arg("token_ids"), py::arg("salt") = py::none(),
          "Reserves KV slots for all token_ids and returns num_cached_tokens: the leading full blocks found in the "
          "prefix cache, at most (len(token_ids) - 1) // block_size of them, so the last token is always computed. "
          "The caller computes tokens [num_cached_tokens, len). Raises ValueError (sequence exists, no tokens) or "
          "NoFreeBlocksError; nothing changes on failure. Ignores the watermark (see can_allocate).")
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"), py::arg("num_new_tokens") = 1,
           "Whether append_slots with num_new_tokens tokens would succeed (including a copy-on-write block).")
      .def(
          "append_slots",
          [](BlockManager& bm, int64_t seq_id, const py::object& token_ids) {
            const Tokens t(token_ids);
            return bm.append_slots(seq_id, t.span());
          },
          py::arg("seq_id"), py::arg("token_ids"),
          "Reserves KV slots for the new token_ids (decode: one). Returns [(src, dst)] copy-on-write block copies "
          "the caller must do on the KV cache before writing: when the partial last block is shared (after fork) "
          "this sequence gets a copy. All-or-nothing: NoFreeBlocksError leaves the state unchanged.")
      .def("mark_computed", &BlockManager::mark_computed, py::arg("seq_id"), py::arg("num_computed_tokens"),
           "The KV of the first num_computed_tokens tokens is in the cache: their full blocks become prefix-cache "
           "entries (only computed blocks can ever be hit). Values not above the current count are no-ops.")
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"),
           "The child shares all of the parent's blocks (ref + 1 each), tokens, salt and counters.")
      .def("truncate", &BlockManager::truncate_tokens, py::arg("seq_id"), py::arg("num_tokens"),
           "Drops the slots of tokens [num_tokens, len) (rejected speculative tokens); blocks left empty are "
           "released tail first. ValueError when num_tokens is below num_computed_tokens or above the length.")
      .def(
          "replace_tokens",
          [](BlockManager& bm, int64_t seq_id, int64_t start, const py::object& token_ids) {
            const Tokens t(token_ids);
            bm.replace_tokens(seq_id, start, t.span());
          },
          py::arg("seq_id"), py::arg("start"), py::arg("token_ids"),
          "Sets the token ids of reserved slots [start, start + len(token_ids)) (multi-step decoding reserves "
          "slots before their tokens are sampled). ValueError when start is below num_computed_tokens or the "
          "range passes the reserved length.")
      .def("free", &BlockManager::free, py::arg("seq_id"),
           "Releases the sequence's blocks tail first: a block reaching ref 0 stays cached (evictable, LRU) if it "
           "is in the prefix cache, else joins the back of the free list. KeyError when unknown or already freed.")
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache,
           "Drops every unreferenced cached block (they join the free list, least recently released first). "
           "Returns True when the prefix cache is now empty, False when blocks in use remain cached.")
      .def("get_block_table", &BlockManager::block_table, py::arg("seq_id"), "The sequence's block ids (a copy).")
      .def(
          "fill_block_tables",
          [](const BlockManager& bm, const std::vector<int64_t>& seq_ids, py::array_t<int32_t> out, int32_t pad) {
            if (out.ndim() != 2 || out.shape(0) != py::ssize_t(seq_ids.size())) {
              throw py::value_error("out must be an int32 array of shape [len(seq_ids), max_blocks]");
            }
            if (!(out.flags() & py::array::c_style) || !out.writeable()) {
              throw py::value_error("out must be C-contiguous and writeable");
            }
            const py::ssize_t width = out.shape(1);
            for (size_t i = 0; i < seq_ids.size(); ++i) {  // check every row before writing any
              if (py::ssize_t(bm.block_table(seq_ids[i]).size()) > width) {
                throw py::value_error("sequence " + std::to_string(seq_ids[i]) + " has " +
                                      std::to_string(bm.block_table(seq_ids[i]).size()) +
                                      " blocks, out has room for " + std::to_string(width));
              }
            }
            int32_t* o = out.mutable_data();
            for (size_t i = 0; i < seq_ids.size(); ++i, o += width) {
              const std::vector<int32_t>& t = bm.block_table(seq_ids[i]);
              std::copy(t.begin(), t.end(), o);
              std::fill(o + t.size(), o + width, pad);
            }
          },
          py::arg("seq_ids"), py::arg("out").noconvert(), py::arg("pad") = 0,
          "Writes the block tables of seq_ids into the rows of out (int32 [len(seq_ids), max_blocks], C-contiguous), "
          "padding each row with pad: the paged-attention block_tables input without a Python list per sequence.")
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"), "Tokens with reserved KV slots.")
      .def("num_cached_tokens", &BlockManager::num_cached_tokens, py::arg("seq_id"),
           "Tokens served from the prefix cache at allocate().")
      .def("num_computed_tokens", &BlockManager::num_computed_tokens, py::arg("seq_id"),
           "The highest count given to mark_computed (or num_cached_tokens).")
      .def(
          "get_salt",
          [](const BlockManager& bm, int64_t seq_id) -> py::object {
            const Salt& s = bm.salt(seq_id);
            return s ? py::object(py::bytes(*s)) : py::object(py::none());
          },
          py::arg("seq_id"), "The sequence's salt as bytes, or None.")
      .def("has_seq", &BlockManager::has_seq, py::arg("seq_id"))
      .def("__contains__", &BlockManager::has_seq, py::arg("seq_id"))
      .def(
          "get_num_common_prefix_blocks",
          [](const BlockManager& bm, const std::vector<int64_t>& seq_ids) { return bm.num_common_prefix_blocks(seq_ids); },
          py::arg("seq_ids"),
           "Leading blocks shared by all the given sequences (same block id at the same index).")
      .def("ref_count", &BlockManager::ref_count, py::arg("block_id"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("watermark_blocks", &BlockManager::watermark_blocks)
      .def_property_readonly("enable_prefix_caching", &BlockManager::enable_prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks,
                             "Free-list blocks plus evictable cached blocks.")
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks, "Blocks with ref > 0.")
      .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks,
                             "Blocks in the prefix cache (in use or evictable).")
      .def_property_readonly("num_seqs", &BlockManager::num_seqs)
      .def_property_readonly("usage", &BlockManager::usage, "num_used_blocks / num_blocks.")
      .def("_free_list", &BlockManager::debug_free_list, "Test hook: the free list, front (next taken) first.")
      .def("_evictable", &BlockManager::debug_evictable,
           "Test hook: evictable cached blocks, least recently released (next evicted) first.")
      .def("_check_invariants", &BlockManager::check_invariants,
           "Test hook: checks every internal structure; raises RuntimeError naming a violation.")
      .def("__repr__", [](const BlockManager& bm) {
        return "BlockManager(num_blocks=" + std::to_string(bm.num_blocks()) +
               ", block_size=" + std::to_string(bm.block_size()) + ", free=" + std::to_string(bm.num_free_blocks()) +
               ", used=" + std::to_string(bm.num_used_blocks()) + ", cached=" + std::to_string(bm.num_cached_blocks()) +
               ", seqs=" + std::to_string(bm.num_seqs()) + ")";
      });
}

}  // namespace pagedllm
