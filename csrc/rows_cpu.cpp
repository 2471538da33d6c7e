// C++ CPU twins of the CUDA row-copy kernels in rows.cu (shard gather, unshard + unpad, fused
// text/video embedding merge forward and backward). Rows are copied with memcpy in parallel.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "rows_check.h"

namespace {

using mlv::Layout;

int64_t grain_rows(int64_t row_bytes) {
  // About 64 KiB per task, so tiny rows are not split into tiny tasks.
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
}

void fill_row(uint8_t* dst, int64_t row_bytes, const uint8_t pattern[16], int32_t elem_size,
              bool zero) {
  if (zero) {
    std::memset(dst, 0, row_bytes);
    return;
  }
  for (int64_t b = 0; b < row_bytes; b += elem_size) std::memcpy(dst + b, pattern, elem_size);
}

void gather_rows(at::Tensor dst, at::Tensor src, at::Tensor index, int64_t n_outer, int64_t n_src,
                 int64_t row_bytes, std::vector<int64_t> dst_layout,
                 std::vector<int64_t> src_layout, at::Tensor pad) {
  mlv::check_tensor(dst, "dst", at::kCPU);
  mlv::check_tensor(src, "src", at::kCPU);
  mlv::check_index(index, "index", at::kCPU);
  TORCH_CHECK(n_outer >= 0 && n_src >= 0 && row_bytes >= 0, "negative size");
  const Layout dl = mlv::to_layout(dst_layout, "dst_layout");
  const Layout sl = mlv::to_layout(src_layout, "src_layout");
  const int64_t n_out = index.numel();
  mlv::check_extent(dst, "dst", dl, n_outer, n_out, row_bytes);
  mlv::check_extent(src, "src", sl, n_outer, n_src, row_bytes);
  uint8_t pattern[16];
  int32_t elem_size = 0, is_zero = 1;
  mlv::pad_bytes(pad, pattern, &elem_size, &is_zero);
  TORCH_CHECK(is_zero || row_bytes % elem_size == 0, "row_bytes must hold whole pad elements");
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_out; ++i) {
    TORCH_CHECK(idx[i] >= -1 && idx[i] < n_src, "index[", i, "] = ", idx[i], " is outside [-1, ",
                n_src, ")");
  }
  uint8_t* d = static_cast<uint8_t*>(dst.data_ptr());
  const uint8_t* s = static_cast<const uint8_t*>(src.data_ptr());
  at::parallel_for(0, n_outer * n_out, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r / n_out, i = r % n_out;
      uint8_t* row = d + mlv::row_offset(dl, row_bytes, o, i);
      if (idx[i] >= 0) {
        std::memcpy(row, s + mlv::row_offset(sl, row_bytes, o, idx[i]), row_bytes);
      } else {
        fill_row(row, row_bytes, pattern, elem_size, is_zero);
      }
    }
  });
}

void check_codes(const at::Tensor& code, int64_t num_video, bool unique) {
  const int64_t* c = code.data_ptr<int64_t>();
  std::vector<uint8_t> seen(unique ? num_video : 0, 0);
  for (int64_t r = 0; r < code.numel(); ++r) {
    TORCH_CHECK(c[r] >= -2 && c[r] < num_video, "src_index[", r, "] = ", c[r],
                " is outside [-2, num_video=", num_video, ")");
    if (unique && c[r] >= 0) {
      TORCH_CHECK(!seen[c[r]], "src_index names video row ", c[r], " twice");
      seen[c[r]] = 1;
    }
  }
}

void merge_rows(at::Tensor out, at::Tensor text, at::Tensor video, at::Tensor code,
                int64_t row_bytes) {
  mlv::check_tensor(out, "out", at::kCPU);
  mlv::check_tensor(text, "text", at::kCPU);
  mlv::check_tensor(video, "video", at::kCPU);
  mlv::check_index(code, "src_index", at::kCPU);
  mlv::check_merge(out, "out", code, row_bytes);
  mlv::check_merge(text, "text", code, row_bytes);
  const int64_t num_video = mlv::video_rows(video, row_bytes, "video");
  check_codes(code, num_video, /*unique=*/false);
  const int64_t* c = code.data_ptr<int64_t>();
  uint8_t* o = static_cast<uint8_t*>(out.data_ptr());
  const uint8_t* t = static_cast<const uint8_t*>(text.data_ptr());
  const uint8_t* v = static_cast<const uint8_t*>(video.data_ptr());
  at::parallel_for(0, code.numel(), grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* row = o + r * row_bytes;
      if (c[r] >= 0) {
        std::memcpy(row, v + c[r] * row_bytes, row_bytes);
      } else if (c[r] == -1) {
        std::memcpy(row, t + r * row_bytes, row_bytes);
      } else {
        std::memset(row, 0, row_bytes);
      }
    }
  });
}

void merge_rows_backward(at::Tensor grad_text, at::Tensor grad_video, at::Tensor grad_out,
                         at::Tensor code, int64_t row_bytes) {
  mlv::check_tensor(grad_text, "grad_text", at::kCPU);
  mlv::check_tensor(grad_video, "grad_video", at::kCPU);
  mlv::check_tensor(grad_out, "grad_out", at::kCPU);
  mlv::check_index(code, "src_index", at::kCPU);
  mlv::check_merge(grad_text, "grad_text", code, row_bytes);
  mlv::check_merge(grad_out, "grad_out", code, row_bytes);
  const int64_t num_video = mlv::video_rows(grad_video, row_bytes, "grad_video");
  check_codes(code, num_video, /*unique=*/true);  // the scatter below has no atomics
  const int64_t* c = code.data_ptr<int64_t>();
  uint8_t* gt = static_cast<uint8_t*>(grad_text.data_ptr());
  uint8_t* gv = static_cast<uint8_t*>(grad_video.data_ptr());
  const uint8_t* g = static_cast<const uint8_t*>(grad_out.data_ptr());
  if (grad_video.nbytes() > 0) std::memset(gv, 0, grad_video.nbytes());
  at::parallel_for(0, code.numel(), grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (c[r] == -1) {
        std::memcpy(gt + r * row_bytes, g + r * row_bytes, row_bytes);
      } else {
        std::memset(gt + r * row_bytes, 0, row_bytes);
      }
      if (c[r] >= 0) std::memcpy(gv + c[r] * row_bytes, g + r * row_bytes, row_bytes);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU row-copy kernels for CP shard / unshard / embedding merge";
  m.def("gather_rows", &gather_rows, "dst row (o, i) = src row (o, index[i]), -1 -> pad");
  m.def("merge_rows", &merge_rows, "fused text/video merge into a padded shard");
  m.def("merge_rows_backward", &merge_rows_backward, "grads of merge_rows");
}
