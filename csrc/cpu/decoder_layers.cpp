// decoder_layers on the CPU: every Llama-family decoder layer of one step in a single call.
//
// Why: a decode step of the default model runs ~13 small ops per layer, 30 layers. From Python each
// op costs its dispatch plus the modules' Python around it (~100-150 us a layer, more with the
// caches cold after the GEMMs); the second core idles meanwhile. This op chains the same kernels
// in C++, in the same order and with the same arguments as python/pagedllm/models/llama.py
// (LlamaDecoderLayer with RMSNorm, packed q/k/v, optional q/k bias and Qwen3's q/k norms, RoPE,
// paged attention, SiLU-and-mul MLP), so its results are the Python path's, bit for bit.
// python/pagedllm/models/cpu_decoder_layers.py decides when it applies and flattens the layers.
//
// A float32 model, or a bfloat16 / float16 one (hidden in its dtype): its GEMMs of 1 to the 16-bit max rows
// take its own 16-bit panels in fp32 math, rounded back (layers/linear.py PackedWeight with act_dtype), the
// rest at::linear in its dtype, and SiLU-and-mul is at::silu(gate) * up, as layers/activation.py does.
//
// tensors: [cos_sin_cache] then kLayerTensors per layer (Slot order; a 0-element tensor = absent).
// ints: [num_heads, num_kv_heads, head_size, is_neox, fp32 panel min rows, code min rows, max rows,
//   16-bit model max rows]
//   then per layer [qkv, o, gate_up, down packed kinds (-1 none, 0 fp32 panels, 1 / 30 fp16 / bf16
//   panels, a GGML type id: exact codes, kInt8Kind + a type id: the int8 mode's codes, every row count),
//   sliding_window].
// floats: [rms_norm eps, attention scale]. Returns [hidden, residual] after the last layer.
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cpu_only_ops.h"
#include "fetch_ahead.h"
#include "next_weight.h"
#include "ops.h"
#include "panel_linear_io.h"

namespace pagedllm::cpu {
namespace {

enum Slot {
  kInputNorm, kQkvWeight, kQkvPacked, kQkvBias, kQNorm, kKNorm, kOWeight, kOPacked, kOBias, kPostNorm,
  kGateUpWeight, kGateUpPacked, kGateUpBias, kDownWeight, kDownPacked, kDownBias, kKeyCache, kValueCache,
  kLayerTensors
};
enum LayerInt { kQkvKind, kOKind, kGateUpKind, kDownKind, kSlidingWindow, kLayerInts };
constexpr int64_t kGlobalInts = 9;
constexpr int64_t kInt8Kind = 256;  // layers/linear.py INT8_KIND

struct Config {
  int64_t num_heads, num_kv_heads, head_size;
  bool is_neox;
  int64_t fp32_min_rows, code_min_rows, max_rows, native16_max_rows, bf16_dot_max_rows;  // PackedWeight.serves
  double eps, scale;
};

// The global ints (kGlobalInts of them, checked by the caller) and the norm eps / attention scale.
Config config_of(at::IntArrayRef ints, double eps, double scale) {
  return Config{ints[0], ints[1], ints[2], ints[3] != 0, ints[4], ints[5], ints[6], ints[7], ints[8], eps, scale};
}

struct Step {  // the AttentionMetadata fields the layers read
  const at::Tensor& positions;
  const at::Tensor& slot_mapping;
  int64_t num_prefill_tokens, max_prefill_query_len, num_decodes;
  const std::optional<at::Tensor>& prefill_query_start_loc;
  const std::optional<at::Tensor>& prefill_seq_lens;
  const std::optional<at::Tensor>& prefill_block_tables;
  const std::optional<at::Tensor>& decode_seq_lens;
  const std::optional<at::Tensor>& decode_block_tables;
};

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.numel() > 0 ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The packed weight of a layer's GEMM as the GEMM after another one reads it (next_weight.h): the kinds
// split in panels over the threads (fp32, 16-bit or code panels); nullptr for none.
const at::Tensor* panels_of(const at::Tensor* layer, int weight_slot, int64_t kind) {
  return kind >= 0 && kind < kInt8Kind ? &layer[weight_slot + 1] : nullptr;
}

// n values of src as To (fp16 / bf16 -> fp32 exact; fp32 -> fp16 / bf16 round to nearest even, as
// Tensor::to): a plain loop, where Tensor::to's dispatch and iterator set-up on the few KB of a 16-bit
// decode GEMM's rows cost more than the conversion.
template <typename To, typename From>
at::Tensor converted(const at::Tensor& x, at::ScalarType to) {
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(to));
  const From* p = src.data_ptr<From>();
  To* o = out.data_ptr<To>();
  for (int64_t i = 0, n = src.numel(); i < n; ++i) o[i] = static_cast<To>(p[i]);
  return out;
}

// The 16-bit x as float32 (exact), and the float32 y rounded back to dtype.
at::Tensor widened(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? converted<float, c10::BFloat16>(x, at::kFloat)
                                          : converted<float, c10::Half>(x, at::kFloat);
}
at::Tensor to_dtype(const at::Tensor& y, at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? converted<c10::BFloat16, float>(y, dtype) : converted<c10::Half, float>(y, dtype);
}

// Linear.forward: the packed copy for the row counts it serves, else F.linear. next: the packed weight
// of the GEMM that follows (panels_of), fetched ahead by this one.
at::Tensor linear(const at::Tensor& x, const at::Tensor* layer, int weight_slot, int64_t kind, const Config& c,
                  const at::Tensor* next) {
  const next_weight::Scope ahead(next);
  const at::Tensor& weight = layer[weight_slot];
  const at::Tensor& packed = layer[weight_slot + 1];
  const std::optional<at::Tensor> bias = present(layer[weight_slot + 2]);
  const int64_t k = x.size(-1);
  if (x.scalar_type() != at::kFloat) {  // a 16-bit model: bf16 dot products, or its own panels in fp32 math
    const int64_t rows = k > 0 ? x.numel() / k : 0;
    if (kind == kBf16DotKind && rows >= 1 && rows <= c.bf16_dot_max_rows) {
      return bf16_dot_linear(x, packed, bias, weight.size(0));
    }
    if (is_wide16_kind(kind) && rows >= 1 && rows <= c.native16_max_rows) {
      const std::optional<at::Tensor> bias32 = bias ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
      return to_dtype(wide16_linear(widened(x), packed, bias32, weight.size(0)), x.scalar_type());
    }
    return at::linear(x, weight, bias);
  }
  if (kind >= kInt8Kind) return int8_linear(x, packed, kind - kInt8Kind, bias, weight.size(0));
  if (kind >= 0 && k > 0) {
    const int64_t rows = x.numel() / k;
    if (rows >= (kind > 0 ? c.code_min_rows : c.fp32_min_rows) && rows <= c.max_rows) {
      if (kind == 0) return packed_linear(x, packed, bias, weight.size(0));
      return is_wide16_kind(kind) ? wide16_linear(x, packed, bias, weight.size(0))
                                  : quantized_linear(x, packed, kind, bias, weight.size(0));
    }
  }
  return at::linear(x, weight, bias);
}

at::Tensor rms_norm_new(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  rms_norm(out, x, weight, eps);
  return out;
}

// LlamaAttention.forward after the input norm: [n, hidden] -> [n, num_heads * head_size].
at::Tensor attention(const at::Tensor& h, const at::Tensor* layer, const int64_t* ints, const at::Tensor& cos_sin,
                     const Config& c, const Step& s) {
  const int64_t D = c.head_size, q_size = c.num_heads * D, kv_size = c.num_kv_heads * D;
  const at::Tensor qkv = linear(h, layer, kQkvWeight, ints[kQkvKind], c, panels_of(layer, kOWeight, ints[kOKind]));
  const int64_t n = qkv.size(0);
  at::Tensor q = qkv.narrow(-1, 0, q_size), k = qkv.narrow(-1, q_size, kv_size);
  const at::Tensor v = qkv.narrow(-1, q_size + kv_size, kv_size);
  if (layer[kQNorm].numel() > 0) {  // Qwen3: RMSNorm over each head, before RoPE
    q = rms_norm_new(q.reshape({-1, D}), layer[kQNorm], c.eps).view({n, -1});
    k = rms_norm_new(k.reshape({-1, D}), layer[kKNorm], c.eps).view({n, -1});
  }
  rotary_embedding(s.positions, q, k, D, cos_sin, c.is_neox);
  const at::Tensor q3 = q.view({n, c.num_heads, D});
  at::Tensor out = at::empty_like(q3);
  at::Tensor key_cache = layer[kKeyCache], value_cache = layer[kValueCache];
  reshape_and_cache(k.view({n, c.num_kv_heads, D}), v.view({n, c.num_kv_heads, D}), key_cache, value_cache,
                    s.slot_mapping);
  const int64_t p = s.num_prefill_tokens, window = ints[kSlidingWindow];
  if (p > 0) {
    at::Tensor out_p = out.narrow(0, 0, p);
    paged_prefill_attention(out_p, q3.narrow(0, 0, p), key_cache, value_cache, *s.prefill_block_tables,
                            *s.prefill_query_start_loc, *s.prefill_seq_lens, s.max_prefill_query_len, c.scale,
                            window, /*causal=*/true);
  }
  if (s.num_decodes > 0) {
    at::Tensor out_d = out.narrow(0, p, n - p);
    paged_attention(out_d, q3.narrow(0, p, n - p), key_cache, value_cache, *s.decode_block_tables,
                    *s.decode_seq_lens, c.scale, window);
  }
  return linear(out.view({n, q_size}), layer, kOWeight, ints[kOKind], c,
                panels_of(layer, kGateUpWeight, ints[kGateUpKind]));
}

// A step's decode sequences as the KV fetch plans read them: their lengths and block tables as int32,
// converted once a step (lens empty: nothing to fetch, no decodes or GEMMs too small to carry a plan).
struct DecodeBlocks {
  at::Tensor lens, tables;  // [num_decodes], [num_decodes, width], contiguous

  DecodeBlocks(const Step& s, int64_t rows) {
    if (s.num_decodes == 0 || !panel::takes_fetch_ahead(rows, panel::kCodesFetchAheadRows)) return;
    lens = s.decode_seq_lens->to(at::kInt).contiguous();
    tables = s.decode_block_tables->to(at::kInt).contiguous();
  }
};

// The KV cache blocks the decode attention of a layer (its caches in `layer`) reads, into plan
// (fetch_ahead.h): every block of each decode's visible keys, K then V.
void plan_decode_kv(fetch_ahead::Plan& plan, const at::Tensor* layer, int64_t window, const DecodeBlocks& d) {
  plan.clear();
  if (!d.lens.defined()) return;
  const at::Tensor &key_cache = layer[kKeyCache], &value_cache = layer[kValueCache];
  const int64_t bs = key_cache.size(2), block_bytes = key_cache.stride(0) * key_cache.element_size();
  const int64_t nb = key_cache.size(0), width = d.tables.size(1);
  const auto* k = static_cast<const char*>(key_cache.data_ptr());
  const auto* v = static_cast<const char*>(value_cache.data_ptr());
  const int32_t* len = d.lens.data_ptr<int32_t>();
  for (int64_t i = 0; i < d.lens.size(0); ++i) {
    const int64_t first = window > 0 ? std::max<int64_t>(0, len[i] - window) / bs : 0;
    const int32_t* row = d.tables.data_ptr<int32_t>() + i * width;
    for (int64_t b = first; b * bs < len[i] && b < width; ++b) {
      if (row[b] < 0 || row[b] >= nb) continue;  // the attention op rejects it
      plan.add(k + row[b] * block_bytes, block_bytes);
      plan.add(v + row[b] * block_bytes, block_bytes);
    }
  }
  plan.split(at::get_num_threads());
}

// LlamaMLP.forward: gate_up, SiLU-and-mul, down. next: the packed weight of the GEMM after it.
at::Tensor mlp(const at::Tensor& h, const at::Tensor* layer, const int64_t* ints, const Config& c,
               const at::Tensor* next) {
  const at::Tensor gate_up =
      linear(h, layer, kGateUpWeight, ints[kGateUpKind], c, panels_of(layer, kDownWeight, ints[kDownKind]));
  const int64_t d = gate_up.size(1) / 2;
  at::Tensor act;
  if (gate_up.scalar_type() == at::kFloat) {
    act = at::empty({gate_up.size(0), d}, gate_up.options());
    silu_and_mul(act, gate_up);
  } else {
    act = at::silu(gate_up.narrow(-1, 0, d)) * gate_up.narrow(-1, d, d);
  }
  return linear(act, layer, kDownWeight, ints[kDownKind], c, next);
}

// The row chunks a step's MLP runs in. Why: at prefill sizes the gate_up output (2048 rows of the default
// model: 25 MB) does not stay in cache, and SiLU-and-mul and the down GEMM read it back from memory; in
// chunks of ~128 rows it does (a 2048-token prefill 3-4% faster in the exact mode, 11-18% in the int8 mode;
// benchmarks/RESULTS.md "Seventh session"). Only where no row's result can depend on the chunking: float32
// rows through the packed kernels (exact: every row its own FMA chains; int8: every row quantized and
// multiplied alone), all of them within the kernels' row range; else one chunk.
constexpr int64_t kMlpChunkRows = 128;
int64_t mlp_chunks(int64_t rows, const int64_t* ints, const Config& c, at::ScalarType dtype) {
  const int64_t chunks = rows / kMlpChunkRows;
  // int8 kinds take every row count; the exact ones up to max_rows (then at::linear, whose bits may depend on M)
  const auto packed = [&](int64_t kind) { return kind >= kInt8Kind || (kind >= 0 && rows <= c.max_rows); };
  if (chunks < 2 || dtype != at::kFloat || !packed(ints[kGateUpKind]) || !packed(ints[kDownKind])) return 1;
  return chunks;  // chunks of kMlpChunkRows to 2 * kMlpChunkRows - 1 rows: above every kind's min rows
}

// LlamaDecoderLayer.forward: (hidden, residual) in, (hidden, residual) out; residual undefined on
// the first layer. next_qkv: the next layer's packed qkv weight (panels_of), nullptr after the last;
// next_kv: the KV blocks the next layer's decode attention reads, fetched during the MLP's GEMMs.
void decoder_layer(at::Tensor& hidden, at::Tensor& residual, const at::Tensor* layer, const int64_t* ints,
                   const at::Tensor& cos_sin, const Config& c, const Step& s, const at::Tensor* next_qkv,
                   fetch_ahead::Plan* next_kv) {
  if (!residual.defined()) {
    residual = hidden;
    hidden = rms_norm_new(hidden, layer[kInputNorm], c.eps);
  } else {
    fused_add_rms_norm(hidden, residual, layer[kInputNorm], c.eps);
  }
  hidden = attention(hidden, layer, ints, cos_sin, c, s);
  fused_add_rms_norm(hidden, residual, layer[kPostNorm], c.eps);
  const fetch_ahead::Scope ahead(next_kv);
  const int64_t rows = hidden.size(0), chunks = mlp_chunks(rows, ints, c, hidden.scalar_type());
  if (chunks == 1) {
    hidden = mlp(hidden, layer, ints, c, next_qkv);
    return;
  }
  at::Tensor out = at::empty_like(hidden);
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t r0 = i * rows / chunks, r1 = (i + 1) * rows / chunks;
    const bool last = i + 1 == chunks;
    out.narrow(0, r0, r1 - r0).copy_(mlp(hidden.narrow(0, r0, r1 - r0), layer, ints, c,
                                         last ? next_qkv : panels_of(layer, kGateUpWeight, ints[kGateUpKind])));
  }
  hidden = out;
}

}  // namespace

at::Tensor layers_linear(const at::Tensor& x, at::TensorList weight, int64_t kind, at::IntArrayRef ints) {
  TORCH_CHECK(weight.size() == 3 && static_cast<int64_t>(ints.size()) >= kGlobalInts,
              "layers_linear: weight must be [weight, packed, bias] and ints decoder_layers' ints");
  return linear(x, weight.data(), 0, kind, config_of(ints, 0.0, 0.0), nullptr);
}

std::vector<at::Tensor> decoder_layers(const at::Tensor& hidden_in, const at::Tensor& positions,
                                       at::TensorList tensors, at::IntArrayRef ints, at::ArrayRef<double> floats,
                                       const at::Tensor& slot_mapping, int64_t num_prefill_tokens,
                                       int64_t max_prefill_query_len, int64_t num_decodes,
                                       const std::optional<at::Tensor>& prefill_query_start_loc,
                                       const std::optional<at::Tensor>& prefill_seq_lens,
                                       const std::optional<at::Tensor>& prefill_block_tables,
                                       const std::optional<at::Tensor>& decode_seq_lens,
                                       const std::optional<at::Tensor>& decode_block_tables) {
  const int64_t num_layers = (static_cast<int64_t>(tensors.size()) - 1) / kLayerTensors;
  TORCH_CHECK(num_layers >= 1 && static_cast<int64_t>(tensors.size()) == 1 + num_layers * kLayerTensors,
              "decoder_layers: tensors must be [cos_sin_cache] + ", static_cast<int>(kLayerTensors),
              " per layer, got ", tensors.size());
  TORCH_CHECK(static_cast<int64_t>(ints.size()) == kGlobalInts + num_layers * kLayerInts && floats.size() == 2,
              "decoder_layers: ints must be ", kGlobalInts, " + ", static_cast<int>(kLayerInts),
              " per layer and floats [eps, scale]");
  const auto dtype = hidden_in.scalar_type();
  TORCH_CHECK(hidden_in.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                  hidden_in.dim() == 2 && hidden_in.is_contiguous(),
              "decoder_layers: hidden must be a contiguous float32, bfloat16 or float16 CPU tensor [num_tokens, hidden]");
  TORCH_CHECK(num_prefill_tokens == 0 || (prefill_query_start_loc && prefill_seq_lens && prefill_block_tables),
              "decoder_layers: a step with prefill tokens needs the prefill metadata");
  TORCH_CHECK(num_decodes == 0 || (decode_seq_lens && decode_block_tables),
              "decoder_layers: a step with decodes needs the decode metadata");
  const Config c = config_of(ints, floats[0], floats[1]);
  const Step s{positions, slot_mapping, num_prefill_tokens, max_prefill_query_len, num_decodes,
               prefill_query_start_loc, prefill_seq_lens, prefill_block_tables, decode_seq_lens, decode_block_tables};
  at::Tensor hidden = hidden_in, residual;
  const auto layer_at = [&](int64_t i) { return tensors.data() + 1 + i * kLayerTensors; };
  const auto ints_at = [&](int64_t i) { return ints.data() + kGlobalInts + i * kLayerInts; };
  const DecodeBlocks decodes(s, hidden_in.size(0));
  fetch_ahead::Plan next_kv;
  for (int64_t i = 0; i < num_layers; ++i) {
    const bool last = i + 1 == num_layers;
    const at::Tensor* next_qkv = last ? nullptr : panels_of(layer_at(i + 1), kQkvWeight, ints_at(i + 1)[kQkvKind]);
    if (!last) plan_decode_kv(next_kv, layer_at(i + 1), ints_at(i + 1)[kSlidingWindow], decodes);
    decoder_layer(hidden, residual, layer_at(i), ints_at(i), tensors[0], c, s, next_qkv, last ? nullptr : &next_kv);
  }
  return {hidden, residual};
}

}  // namespace pagedllm::cpu
