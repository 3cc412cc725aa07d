// The Python module of the CPU kernels (worker.cpu_kernels builds it from every file here).
#include <torch/extension.h>

namespace pagemesh {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
void rope_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                    at::Tensor& k_cache, at::Tensor& v_cache, int64_t heads, int64_t kv_heads);
}  // namespace pagemesh

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &pagemesh::decode_attention, "paged decode attention over the cache in place");
  m.def("rms_norm", &pagemesh::rms_norm, "bf16 RMSNorm, rounded as transformers' is");
  m.def("add_rms_norm", &pagemesh::add_rms_norm, "residual += delta in place; returns rms_norm(residual)");
  m.def("silu_mul", &pagemesh::silu_mul, "[T, 2I] gate|up -> bf16(silu(gate)) * up");
  m.def("rope_and_cache", &pagemesh::rope_and_cache, "rotate q, k of qkv in place; k, v into the paged cache");
}
