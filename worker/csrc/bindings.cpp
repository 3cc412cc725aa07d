// Registers the CPU kernels as torch operators (torch.ops.pagemesh.*), so that torch.profiler
// names them in `python -m pagemesh.bench.profile` like any aten op.
#include <torch/library.h>

namespace pagemesh {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
void rope_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                    at::Tensor& k_cache, at::Tensor& v_cache, int64_t heads, int64_t kv_heads);
void read_rows(int64_t fd, int64_t offset, int64_t rows, const at::Tensor& ids, at::Tensor& out);
}  // namespace pagemesh

TORCH_LIBRARY(pagemesh, m) {
  // paged decode attention over the cache in place
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale) -> Tensor");
  // bf16 RMSNorm, rounded as transformers' is
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // residual += delta in place; returns rms_norm(residual)
  m.def("add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor weight, float eps) -> Tensor");
  // [T, 2I] gate|up -> bf16(silu(gate)) * up
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  // rotate q, k of qkv in place; k, v into the paged cache (bf16, or int8 rows: kv_int8.h)
  m.def("rope_and_cache(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor slots, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, int heads, int kv_heads) -> ()");
  // out[i] = row ids[i] of a [rows, cols] table at byte offset of open file fd (read_rows.cpp)
  m.def("read_rows(int fd, int offset, int rows, Tensor ids, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(pagemesh, CPU, m) {
  m.impl("decode_attention", &pagemesh::decode_attention);
  m.impl("rms_norm", &pagemesh::rms_norm);
  m.impl("add_rms_norm", &pagemesh::add_rms_norm);
  m.impl("silu_mul", &pagemesh::silu_mul);
  m.impl("rope_and_cache", &pagemesh::rope_and_cache);
  m.impl("read_rows", &pagemesh::read_rows);
}
