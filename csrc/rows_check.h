// Argument checks shared by the CPU (rows_cpu.cpp) and CUDA (rows_cuda.cpp) torch bindings: the
// kernels take raw bytes, so every row they may touch is proven to lie inside its tensor first.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace mlv {

struct Layout {
  int64_t chunk_len;
  int64_t chunk_stride;
  int64_t outer_stride;
};

inline Layout to_layout(const std::vector<int64_t>& v, const char* name) {
  TORCH_CHECK(v.size() == 3, name, " must be (chunk_len, chunk_stride, outer_stride)");
  TORCH_CHECK(v[0] >= 1 && v[1] >= 0 && v[2] >= 0, name, " has a negative stride or chunk_len < 1");
  return Layout{v[0], v[1], v[2]};
}

inline int64_t row_offset(const Layout& l, int64_t row_bytes, int64_t o, int64_t j) {
  return (j / l.chunk_len) * l.chunk_stride + o * l.outer_stride + (j % l.chunk_len) * row_bytes;
}

inline void check_extent(const at::Tensor& t, const char* name, const Layout& l, int64_t n_outer,
                         int64_t n, int64_t row_bytes) {
  if (n_outer == 0 || n == 0 || row_bytes == 0) return;
  int64_t last_j = std::min(l.chunk_len - 1, n - 1);
  int64_t end = ((n - 1) / l.chunk_len) * l.chunk_stride + (n_outer - 1) * l.outer_stride +
                last_j * row_bytes + row_bytes;
  TORCH_CHECK(end <= static_cast<int64_t>(t.nbytes()), name, ": rows reach byte ", end, " of a ", t.nbytes(),
              "-byte tensor");
}

inline void check_tensor(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.defined() && t.device().type() == device, name, " must be a ", device, " tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_index(const at::Tensor& t, const char* name, c10::DeviceType device) {
  check_tensor(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1, name, " must be a 1-D int64 tensor");
}

// The pad value as one element's bytes; empty means zeros.
inline void pad_bytes(const at::Tensor& pad, uint8_t out[16], int32_t* elem_size, int32_t* is_zero) {
  std::memset(out, 0, 16);
  *elem_size = static_cast<int32_t>(pad.numel());
  *is_zero = 1;
  if (pad.numel() == 0) return;
  TORCH_CHECK(pad.device().is_cpu() && pad.scalar_type() == at::kByte && pad.is_contiguous(),
              "pad must be a contiguous CPU uint8 tensor");
  int64_t n = pad.numel();
  TORCH_CHECK(n == 1 || n == 2 || n == 4 || n == 8 || n == 16, "pad element size must divide 16");
  const uint8_t* p = pad.data_ptr<uint8_t>();
  for (int i = 0; i < 16; ++i) {
    out[i] = p[i % n];
    if (out[i] != 0) *is_zero = 0;
  }
}

inline void check_merge(const at::Tensor& rows, const char* name, const at::Tensor& code,
                        int64_t row_bytes) {
  TORCH_CHECK(row_bytes >= 0, "row_bytes must be >= 0");
  TORCH_CHECK(static_cast<int64_t>(rows.nbytes()) == code.numel() * row_bytes, name, " must hold ", code.numel(),
              " rows of ", row_bytes, " bytes");
}

inline int64_t video_rows(const at::Tensor& video, int64_t row_bytes, const char* name) {
  if (row_bytes == 0) return 0;
  const int64_t nbytes = static_cast<int64_t>(video.nbytes());
  TORCH_CHECK(nbytes % row_bytes == 0, name, " must hold whole rows of ", row_bytes,
              " bytes");
  return nbytes / row_bytes;
}

}  // namespace mlv
