// Rows of a table that stays in its checkpoint file, read with pread. Looking them up through a
// mapping of the file instead makes the kernel map the 64 KiB around every row it faults in
// (fault-around; madvise(MADV_RANDOM) does not stop it): SmolLM2's fp32 table, 108 MiB, was 99 MiB
// resident after 32 prompts of random token ids. pread copies just the rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cerrno>
#include <cstring>
#include <unistd.h>

namespace pagemesh {

void read_rows(int64_t fd, int64_t offset, int64_t rows, const at::Tensor& ids, at::Tensor& out) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "read_rows: ids must be 1-D int64");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == ids.size(0),
              "read_rows: out must be a contiguous [len(ids), cols] tensor");
  const auto id = ids.contiguous();
  const int64_t* index = id.data_ptr<int64_t>();
  const int64_t row_bytes = out.size(1) * out.element_size();
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < id.size(0); ++i) {
    TORCH_CHECK_INDEX(index[i] >= 0 && index[i] < rows, "index ", index[i], " is out of range for ",
                      rows, " embedding rows");
  }
  at::parallel_for(0, id.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t done = 0;
      while (done < row_bytes) {
        const ssize_t n = pread(static_cast<int>(fd), dst + i * row_bytes + done, row_bytes - done,
                                offset + index[i] * row_bytes + done);
        if (n < 0 && errno == EINTR) continue;
        TORCH_CHECK(n > 0, "read_rows: pread failed: ", n < 0 ? std::strerror(errno) : "end of file");
        done += n;
      }
    }
  });
}

}  // namespace pagemesh
