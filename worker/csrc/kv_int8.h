// The int8 KV cache's row format (`--kv-cache-dtype int8`): each (token, KV head) row is head_dim
// int8 values followed by their fp16 scale, so one tensor [num_blocks, block_size, kv_heads,
// head_dim + 2] holds both and block ids address it as they do a bf16 cache (llama.cpp's q8_0
// keeps fp16 scales inline the same way). Symmetric: x ~= q * scale, scale = max|x| / 127.
// worker/kv_quant.py is the same format in torch.
#pragma once

#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pagemesh {

constexpr int64_t kInt8ScaleBytes = 2;

inline float int8_row_scale(const int8_t* row, int64_t dim) {
  uint16_t bits;
  std::memcpy(&bits, row + dim, sizeof(bits));
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // one instruction; c10's portable conversion is ~10
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// value(d) -> float for d < dim; writes dim int8 values and the scale at dst.
template <typename Value>
inline void quantize_row(const Value& value, int64_t dim, int8_t* dst) {
  float amax = 0.f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(value(d)));
  const float scale = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t d = 0; d < dim; ++d)
    dst[d] = static_cast<int8_t>(std::nearbyint(std::clamp(value(d) * inv, -127.f, 127.f)));
  const uint16_t bits = c10::Half(scale).x;
  std::memcpy(dst + dim, &bits, sizeof(bits));
}

}  // namespace pagemesh
