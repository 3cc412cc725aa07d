// Paged decode attention for the CPU: one query token per sequence, read straight from the paged
// KV cache through the block table (no gathered copy of the context), softmax and sums in fp32.
//
// q [B, heads, D]; k_cache, v_cache [num_blocks, block_size, kv_heads, D] in q's dtype, or int8
// [..., D + 2] rows with inline scales (kv_int8.h); block_tables [B, W] int32; seq_lens [B] int32.
// Returns [B, heads, D] in q's dtype. One work item is a (sequence, kv head) pair: its query heads
// (the GQA group) share every key and value row it loads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_math.h"
#include "kv_int8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pagemesh {
namespace {

constexpr int64_t kTile = 16;  // tokens scored together

template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}


// Ask for the next block's rows of this head while the current block is computed: the blocks of
// one context lie anywhere in the cache, so the hardware prefetcher cannot guess them.
template <typename scalar_t>
inline void prefetch_block(const scalar_t* rows, int64_t count, int64_t token_stride, int64_t dim) {
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t t = 0; t < count; ++t) {
    const char* row = reinterpret_cast<const char*>(rows + t * token_stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
  }
}

// exp(s - max) over each of the group's score rows [group, length], left unnormalized: the sums'
// inverses go to inv_sum and scale the weighted values once at the end.
inline void softmax_rows(float* scores, int64_t group, int64_t length, float* inv_sum) {
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * length;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < length; ++t) top = std::max(top, sg[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < length; ++t) {
      sg[t] = exp_approx(sg[t] - top);
      sum += sg[t];
    }
    inv_sum[g] = 1.f / sum;
  }
}

#if defined(__AVX512BF16__)
// q_g . k_t for every query row of the group at once, bf16 pairs multiplied and summed in fp32 by
// vdpbf16ps (the products a bf16 matmul would form); dim is a multiple of 32.
inline void score_row_bf16(const c10::BFloat16* q, const c10::BFloat16* k, int64_t group, int64_t dim,
                           float scale, float* out, int64_t out_stride) {
  for (int64_t g = 0; g < group; ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 32) {
      const __m512i kv = _mm512_loadu_si512(reinterpret_cast<const void*>(k + d));
      const __m512i qv = _mm512_loadu_si512(reinterpret_cast<const void*>(q + g * dim + d));
      acc = _mm512_dpbf16_ps(acc, (__m512bh)qv, (__m512bh)kv);
    }
    out[g * out_stride] = _mm512_reduce_add_ps(acc) * scale;
  }
}
#endif

#if defined(__AVX512F__)
// acc[g, :] = sum_t p[g, t] v_t for one (sequence, KV head): 16 lanes of the head dimension at a
// time, each query row's sum in registers across the whole context. GROUP is a template argument
// so the sums stay in registers; two tokens at a time break the FMA dependency chain.
template <int GROUP, typename scalar_t>
void weighted_values(const scalar_t* v_ptr, const int32_t* table, int64_t length, int64_t block_size,
                     int64_t block_stride, int64_t token_stride, int64_t head_offset, int64_t dim,
                     const float* probs, float* acc) {
  const int64_t num_blocks = (length + block_size - 1) / block_size;
  for (int64_t c = 0; c < dim; c += 16) {
    __m512 even[GROUP], odd[GROUP];
    for (int g = 0; g < GROUP; ++g) even[g] = odd[g] = _mm512_setzero_ps();
    for (int64_t block = 0; block < num_blocks; ++block) {
      const scalar_t* base = v_ptr + table[block] * block_stride + head_offset + c;
      const int64_t block_len = std::min(block_size, length - block * block_size);
      if (c == 0 && block + 1 < num_blocks)
        prefetch_block(v_ptr + table[block + 1] * block_stride + head_offset,
                       std::min(block_size, length - (block + 1) * block_size), token_stride, dim);
      const float* p = probs + block * block_size;
      int64_t t = 0;
      for (; t + 1 < block_len; t += 2) {
        const __m512 v0 = load16(base + t * token_stride), v1 = load16(base + (t + 1) * token_stride);
        for (int g = 0; g < GROUP; ++g) {
          even[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * length + t]), v0, even[g]);
          odd[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * length + t + 1]), v1, odd[g]);
        }
      }
      if (t < block_len) {
        const __m512 v0 = load16(base + t * token_stride);
        for (int g = 0; g < GROUP; ++g)
          even[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * length + t]), v0, even[g]);
      }
    }
    for (int g = 0; g < GROUP; ++g) _mm512_storeu_ps(acc + g * dim + c, _mm512_add_ps(even[g], odd[g]));
  }
}

// The group size as a template argument; false where the vector path does not cover it.
template <typename scalar_t>
bool weighted_values_any(int64_t group, const scalar_t* v_ptr, const int32_t* table, int64_t length,
                         int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t head_offset,
                         int64_t dim, const float* probs, float* acc) {
  if (dim % 16 != 0) return false;
#define PAGEMESH_GROUP_CASE(G)                                                                       \
  case G:                                                                                           \
    weighted_values<G>(v_ptr, table, length, block_size, block_stride, token_stride, head_offset, dim, \
                       probs, acc);                                                                 \
    return true;
  switch (group) {
    PAGEMESH_GROUP_CASE(1)
    PAGEMESH_GROUP_CASE(2)
    PAGEMESH_GROUP_CASE(3)
    PAGEMESH_GROUP_CASE(4)
    PAGEMESH_GROUP_CASE(5)
    PAGEMESH_GROUP_CASE(6)
    PAGEMESH_GROUP_CASE(7)
    PAGEMESH_GROUP_CASE(8)
    default:
      return false;
  }
#undef PAGEMESH_GROUP_CASE
}
#endif

// An int8 cache (kv_int8.h) is read by the same walk: each key row's dot products with the
// group's queries times its scale; the softmax weights times each value row's scale, then the
// same weighted sum (load16 and to_float convert int8). Half the bytes of a bf16 cache.
#if defined(__AVX512F__)
// scores[g * out_stride] = (q_g . k) * k's scale for one int8 key row; qf holds the group's
// queries in fp32 (already times the softmax scale), kf is a dim-float scratch row; dim % 16 == 0.
inline void score_row_int8(const float* qf, const int8_t* k, int64_t group, int64_t dim, float* kf,
                           float* out, int64_t out_stride) {
  const float k_scale = int8_row_scale(k, dim);
  for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(kf + d, load16(k + d));
  for (int64_t g = 0; g < group; ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * dim + d), _mm512_loadu_ps(kf + d), acc);
    out[g * out_stride] = _mm512_reduce_add_ps(acc) * k_scale;
  }
}
#endif

// p[g, t] *= the scale of value row t: each scale read once, not once per 16 lanes of the row.
inline void scale_value_weights(float* probs, const int8_t* v_ptr, const int32_t* table, int64_t length,
                                int64_t group, int64_t block_size, int64_t block_stride, int64_t token_stride,
                                int64_t head_offset, int64_t dim) {
  for (int64_t start = 0, block = 0; start < length; start += block_size, ++block) {
    const int8_t* rows = v_ptr + table[block] * block_stride + head_offset;
    for (int64_t t = start; t < std::min(length, start + block_size); ++t) {
      const float scale = int8_row_scale(rows + (t - start) * token_stride, dim);
      for (int64_t g = 0; g < group; ++g) probs[g * length + t] *= scale;
    }
  }
}

// scalar_t: q's and the output's dtype; cache_t: the cache's, scalar_t or int8_t.
template <typename scalar_t, typename cache_t>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                           at::Tensor& out) {
  constexpr bool int8_cache = std::is_same_v<cache_t, int8_t>;
  const int64_t num_seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), row = k_cache.size(3);
  const int64_t group = heads / kv_heads;
  const int64_t token_stride = kv_heads * row, block_stride = block_size * token_stride;
  const int64_t table_stride = block_tables.stride(0);
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const cache_t* k_ptr = k_cache.data_ptr<cache_t>();
  const cache_t* v_ptr = v_cache.data_ptr<cache_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);

  // Items are handed out one at a time (dynamic schedule) rather than split in equal halves: when
  // another process takes a core from one thread, the others carry on with the rest, and
  // contexts of unequal length balance. Same OpenMP runtime and thread count as torch's.
  const int64_t items = num_seqs * kv_heads;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), items));
#pragma omp parallel num_threads(threads)
  {
    // Keys of the generic path are scored a tile of kTile tokens at a time from a transposed fp32
    // copy, so the inner loop runs across tokens (one vector) with no horizontal sum per dot.
    std::vector<float> qf(group * dim), acc(group * dim), values(dim), keys_t(dim * kTile), scores;
    std::vector<float> inv_sum(group);
#if defined(__AVX512BF16__)
    const bool bf16_rows = std::is_same_v<cache_t, c10::BFloat16> && dim % 32 == 0;
#else
    const bool bf16_rows = false;
#endif
#if defined(__AVX512F__)
    const bool int8_rows = int8_cache && dim % 16 == 0;
#else
    const bool int8_rows = false;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t seq = item / kv_heads, head = item % kv_heads;
      const int64_t length = lens[seq];
      const int32_t* table = tables + seq * table_stride;
      const int64_t first_q = (seq * heads + head * group) * dim;
      const int64_t head_offset = head * row;
      const int64_t num_blocks = (length + block_size - 1) / block_size;
      if (!bf16_rows) {  // the other paths score with a scaled fp32 copy of the queries
        load_row(q_ptr + first_q, qf.data(), group * dim);
        for (auto& x : qf) x *= fscale;
      }
      scores.resize(group * length);

      // Walk the context block by block: no division per token, one table read per block.
      for (int64_t block = 0; block < num_blocks; ++block) {  // scores[g, t] = q_g . k_t
        const cache_t* base = k_ptr + table[block] * block_stride + head_offset;
        const int64_t block_len = std::min(block_size, length - block * block_size);
        if (block + 1 < num_blocks)
          prefetch_block(k_ptr + table[block + 1] * block_stride + head_offset,
                         std::min(block_size, length - (block + 1) * block_size), token_stride, row);
#if defined(__AVX512F__)
        if constexpr (int8_cache) {
          if (int8_rows) {
            for (int64_t t = 0; t < block_len; ++t)
              score_row_int8(qf.data(), base + t * token_stride, group, dim, values.data(),
                             scores.data() + block * block_size + t, length);
            continue;
          }
        }
#endif
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<cache_t, c10::BFloat16>) {
          if (bf16_rows) {
            for (int64_t t = 0; t < block_len; ++t)
              score_row_bf16(q_ptr + first_q, base + t * token_stride, group, dim, fscale,
                             scores.data() + block * block_size + t, length);
            continue;
          }
        }
#endif
        for (int64_t start = 0; start < block_len; start += kTile) {
          const int64_t n = std::min(kTile, block_len - start);
          float key_scale[kTile];
          for (int64_t t = 0; t < n; ++t) {
            const cache_t* k = base + (start + t) * token_stride;
            for (int64_t d = 0; d < dim; ++d) keys_t[d * kTile + t] = to_float(k[d]);
            if constexpr (int8_cache) key_scale[t] = int8_row_scale(k, dim);
          }
          for (int64_t t = n; t < kTile; ++t)
            for (int64_t d = 0; d < dim; ++d) keys_t[d * kTile + t] = 0.f;
          for (int64_t g = 0; g < group; ++g) {
            float tile[kTile] = {};
            const float* qg = qf.data() + g * dim;
            for (int64_t d = 0; d < dim; ++d) {
              const float qd = qg[d];
              const float* kd = keys_t.data() + d * kTile;
#pragma omp simd
              for (int64_t t = 0; t < kTile; ++t) tile[t] += qd * kd[t];
            }
            if constexpr (int8_cache)
              for (int64_t t = 0; t < n; ++t) tile[t] *= key_scale[t];
            std::memcpy(scores.data() + g * length + block * block_size + start, tile, n * sizeof(float));
          }
        }
      }
      softmax_rows(scores.data(), group, length, inv_sum.data());
      if constexpr (int8_cache)
        scale_value_weights(scores.data(), v_ptr, table, length, group, block_size, block_stride, token_stride,
                            head_offset, dim);
      bool summed = false;  // acc[g] = sum_t p[g, t] v_t (p times v_t's scale for int8)
#if defined(__AVX512F__)
      summed = weighted_values_any(group, v_ptr, table, length, block_size, block_stride, token_stride, head_offset,
                                   dim, scores.data(), acc.data());
#endif
      if (!summed) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t block = 0; block < num_blocks; ++block) {
          const cache_t* base = v_ptr + table[block] * block_stride + head_offset;
          const int64_t block_len = std::min(block_size, length - block * block_size);
          for (int64_t t = 0; t < block_len; ++t) {
            load_row(base + t * token_stride, values.data(), dim);
            const int64_t pos = block * block_size + t;
            for (int64_t g = 0; g < group; ++g) {
              const float p = scores[g * length + pos];
              float* ag = acc.data() + g * dim;
#pragma omp simd
              for (int64_t d = 0; d < dim; ++d) ag[d] += p * values[d];
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          out_ptr[first_q + g * dim + d] = static_cast<scalar_t>(acc[g * dim + d] * inv_sum[g]);
    }
  }
}

// The cache holds q's dtype or int8 rows.
template <typename scalar_t>
void decode_attention_for(bool int8_cache, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                          double scale, at::Tensor& out) {
  if (int8_cache)
    decode_attention_impl<scalar_t, int8_t>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  else
    decode_attention_impl<scalar_t, scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "not contiguous");
  const bool int8_cache = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK((int8_cache || q.scalar_type() == k_cache.scalar_type()) &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "the cache must be in q's dtype or int8");
  const int64_t row = int8_cache ? q.size(2) + kInt8ScaleBytes : q.size(2);
  TORCH_CHECK(row == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head shapes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(block_tables.size(0) >= q.size(0) && block_tables.stride(1) == 1, "block table rows");
  TORCH_CHECK(seq_lens.is_contiguous() && seq_lens.size(0) >= q.size(0), "seq_lens");
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kBFloat16:
      decode_attention_for<c10::BFloat16>(int8_cache, q, k_cache, v_cache, block_tables, seq_lens, scale, out);
      break;
    case at::kHalf:
      decode_attention_for<c10::Half>(int8_cache, q, k_cache, v_cache, block_tables, seq_lens, scale, out);
      break;
    case at::kFloat:
      decode_attention_for<float>(int8_cache, q, k_cache, v_cache, block_tables, seq_lens, scale, out);
      break;
    default:
      TORCH_CHECK(false, "decode_attention: bfloat16, float16 or float32, not ", q.scalar_type());
  }
  return out;
}

}  // namespace pagemesh
