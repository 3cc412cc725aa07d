// The small per-layer operations of a bf16 decoder, each one pass over its rows instead of the
// 5-10 torch ops (and as many dispatches, allocations and OpenMP launches) it replaces. At 32
// decode tokens a layer's rows are ~18K values: there the launches, not the arithmetic, were the
// cost. Every op rounds where Hugging Face's bf16 Llama rounds (each torch op's output is bf16),
// so the results are those of the torch code they replace up to the order of one fp32 sum
// (RMSNorm's) and the last bit of exp (SiLU's).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_math.h"
#include "kv_int8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pagemesh {
namespace {

using bf16 = c10::BFloat16;

// Round to nearest even, as c10::BFloat16(float) does for finite values, in a vectorizable form.
inline uint16_t round_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float round_float(float f) {
  const uint32_t bits = static_cast<uint32_t>(round_bits(f)) << 16;
  float r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}

#if defined(__AVX512F__)
// 16 lanes of bf16 rounding and stores: gcc leaves the scalar form of the SiLU loop unvectorized.
inline __m512i round_bits16(__m512 f) {  // as round_bits, in the low half of each lane
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}

inline __m512 round_float16(__m512 f) { return _mm512_castsi512_ps(_mm512_slli_epi32(round_bits16(f), 16)); }

inline void store_bf16x16(uint16_t* p, __m512 f) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(round_bits16(f)));
}
#endif

// Rows in parallel only when there are enough values to pay for waking the other threads.
template <typename F>
void for_rows(int64_t rows, int64_t row_size, const F& body) {
  if (rows * row_size < (1 << 16)) {
    for (int64_t r = 0; r < rows; ++r) body(r);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t r = 0; r < rows; ++r) body(r);
}

// out = w * bf16(x * rsqrt(mean(x^2) + eps)), x read as fp32: transformers' LlamaRMSNorm.
inline void rms_norm_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t n, float eps) {
  const bf16* xb = reinterpret_cast<const bf16*>(x);
  const bf16* wb = reinterpret_cast<const bf16*>(w);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) {
    const float f = to_float(xb[i]);
    squares += f * f;
  }
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = round_bits(to_float(wb[i]) * round_float(to_float(xb[i]) * inv));
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, ": bfloat16 only");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, ": a contiguous [rows, features] tensor");
}

uint16_t* bits_of(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.numel() == x.size(1), "rms_norm: weight");
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(1);
  const uint16_t *xp = bits_of(x), *wp = bits_of(weight.contiguous());
  uint16_t* op = bits_of(out);
  for_rows(x.size(0), n, [&](int64_t r) { rms_norm_row(xp + r * n, wp, op + r * n, n, static_cast<float>(eps)); });
  return out;
}

// residual += delta (rounded to bf16, as `h + delta` is), then returns rms_norm(residual).
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(residual, "add_rms_norm");
  check_rows(delta, "add_rms_norm delta");
  TORCH_CHECK(residual.sizes() == delta.sizes(), "add_rms_norm: shapes differ");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.numel() == residual.size(1), "add_rms_norm: weight");
  at::Tensor out = at::empty_like(residual);
  const int64_t n = residual.size(1);
  uint16_t* hp = bits_of(residual);
  const uint16_t *dp = bits_of(delta), *wp = bits_of(weight.contiguous());
  uint16_t* op = bits_of(out);
  for_rows(residual.size(0), n, [&](int64_t r) {
    uint16_t* h = hp + r * n;
    const bf16* hb = reinterpret_cast<const bf16*>(h);
    const bf16* db = reinterpret_cast<const bf16*>(dp + r * n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = round_bits(to_float(hb[i]) + to_float(db[i]));
    rms_norm_row(h, wp, op + r * n, n, static_cast<float>(eps));
  });
  return out;
}

// [rows, 2I] (gate | up) -> [rows, I]: bf16(silu(gate)) * up, each rounded to bf16.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  const uint16_t* gp = bits_of(gate_up);
  uint16_t* op = bits_of(out);
  for_rows(rows, n, [&](int64_t r) {
    const bf16* g = reinterpret_cast<const bf16*>(gp + r * 2 * n);
    const bf16* u = g + n;
    uint16_t* o = op + r * n;
    int64_t i = 0;
#if defined(__AVX512F__)
    const uint16_t* gb = gp + r * 2 * n;
    for (; i + 16 <= n; i += 16) {
      const __m512 x = load16(reinterpret_cast<const bf16*>(gb + i));
      const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
      store_bf16x16(o + i, _mm512_mul_ps(round_float16(silu), load16(reinterpret_cast<const bf16*>(gb + n + i))));
    }
#endif
    for (; i < n; ++i) {
      const float x = to_float(g[i]);
      o[i] = round_bits(round_float(x / (1.f + exp_approx(-x))) * to_float(u[i]));
    }
  });
  return out;
}

// Rotates the q and k heads of qkv [T, (heads + 2 kv_heads) * D] in place (rotate-half RoPE,
// rounded as q * cos + rotate_half(q) * sin is in bf16), then copies each token's k and v heads
// into the paged cache [num_blocks, block_size, kv_heads, D] at its slot.
void rope_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                    at::Tensor& k_cache, at::Tensor& v_cache, int64_t heads, int64_t kv_heads) {
  check_rows(qkv, "rope_and_cache");
  check_rows(cos, "rope_and_cache cos");
  check_rows(sin, "rope_and_cache sin");
  const int64_t tokens = qkv.size(0), dim = cos.size(1), half = dim / 2;
  constexpr int64_t kMaxHeadDim = 1024;  // one rotated head is staged on the stack
  TORCH_CHECK(dim % 2 == 0 && dim <= kMaxHeadDim, "rope_and_cache: head_dim must be even and <= 1024");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim && cos.size(0) == tokens && sin.sizes() == cos.sizes(),
              "rope_and_cache: shapes");
  // A bf16 cache row is the head; an int8 one is the quantized head and its scale (kv_int8.h).
  const bool int8_cache = k_cache.scalar_type() == at::kChar;
  const int64_t cache_row = int8_cache ? dim + kInt8ScaleBytes : dim;
  TORCH_CHECK((int8_cache || k_cache.scalar_type() == at::kBFloat16) && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.dim() == 4 && k_cache.size(2) == kv_heads &&
                  k_cache.size(3) == cache_row && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "rope_and_cache: the cache");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == tokens, "rope_and_cache: int64 slots");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), row = qkv.size(1), kv_row = kv_heads * dim;
  const int64_t* slot = slots.contiguous().data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "rope_and_cache: slot");
  uint16_t* qp = bits_of(qkv);
  const uint16_t *cp = bits_of(cos), *sp = bits_of(sin);
  char* const k_base = static_cast<char*>(k_cache.data_ptr());
  char* const v_base = static_cast<char*>(v_cache.data_ptr());
  const int64_t slot_bytes = kv_heads * cache_row * k_cache.element_size();
  for_rows(tokens, row, [&](int64_t t) {
    const bf16* c = reinterpret_cast<const bf16*>(cp + t * dim);
    const bf16* s = reinterpret_cast<const bf16*>(sp + t * dim);
    uint16_t* token = qp + t * row;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      uint16_t* x = token + h * dim;
      const bf16* xb = reinterpret_cast<const bf16*>(x);
      uint16_t rotated[kMaxHeadDim];
#pragma omp simd
      for (int64_t d = 0; d < half; ++d)
        rotated[d] = round_bits(round_float(to_float(xb[d]) * to_float(c[d])) -
                                round_float(to_float(xb[d + half]) * to_float(s[d])));
#pragma omp simd
      for (int64_t d = half; d < dim; ++d)
        rotated[d] = round_bits(round_float(to_float(xb[d]) * to_float(c[d])) +
                                round_float(to_float(xb[d - half]) * to_float(s[d])));
      std::memcpy(x, rotated, dim * sizeof(uint16_t));
    }
    const uint16_t *k = token + heads * dim, *v = k + kv_row;
    char* const k_slot = k_base + slot[t] * slot_bytes;
    char* const v_slot = v_base + slot[t] * slot_bytes;
    if (!int8_cache) {
      std::memcpy(k_slot, k, kv_row * sizeof(uint16_t));
      std::memcpy(v_slot, v, kv_row * sizeof(uint16_t));
      return;
    }
    int8_t* kc = reinterpret_cast<int8_t*>(k_slot);
    int8_t* vc = reinterpret_cast<int8_t*>(v_slot);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const bf16* kh = reinterpret_cast<const bf16*>(k + h * dim);
      const bf16* vh = reinterpret_cast<const bf16*>(v + h * dim);
      quantize_row([&](int64_t d) { return to_float(kh[d]); }, dim, kc + h * cache_row);
      quantize_row([&](int64_t d) { return to_float(vh[d]); }, dim, vc + h * cache_row);
    }
  });
}

}  // namespace pagemesh
