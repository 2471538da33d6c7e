// Torch binding of the CUDA row-copy kernels in rows.cu; compiled only where torch has CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "rows.h"
#include "rows_check.h"

namespace {

MlvRowLayout to_c(const mlv::Layout& l) { return MlvRowLayout{l.chunk_len, l.chunk_stride, l.outer_stride}; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void gather_rows(at::Tensor dst, at::Tensor src, at::Tensor index, int64_t n_outer, int64_t n_src,
                 int64_t row_bytes, std::vector<int64_t> dst_layout,
                 std::vector<int64_t> src_layout, at::Tensor pad) {
  mlv::check_tensor(dst, "dst", at::kCUDA);
  mlv::check_tensor(src, "src", at::kCUDA);
  mlv::check_index(index, "index", at::kCUDA);
  TORCH_CHECK(dst.device() == src.device() && src.device() == index.device(),
              "dst, src and index must be on one device");
  TORCH_CHECK(n_outer >= 0 && n_src >= 0 && row_bytes >= 0, "negative size");
  const mlv::Layout dl = mlv::to_layout(dst_layout, "dst_layout");
  const mlv::Layout sl = mlv::to_layout(src_layout, "src_layout");
  mlv::check_extent(dst, "dst", dl, n_outer, index.numel(), row_bytes);
  mlv::check_extent(src, "src", sl, n_outer, n_src, row_bytes);
  MlvPad p;
  mlv::pad_bytes(pad, p.bytes, &p.elem_size, &p.is_zero);
  TORCH_CHECK(p.is_zero || row_bytes % p.elem_size == 0, "row_bytes must hold whole pad elements");
  c10::cuda::CUDAGuard guard(dst.device());
  check_launch(mlv_gather_rows(dst.data_ptr(), src.data_ptr(), index.data_ptr<int64_t>(), n_outer,
                               index.numel(), n_src, row_bytes, to_c(dl), to_c(sl), p,
                               at::cuda::getCurrentCUDAStream()),
               "mlv_gather_rows");
}

void merge_rows(at::Tensor out, at::Tensor text, at::Tensor video, at::Tensor code,
                int64_t row_bytes) {
  mlv::check_tensor(out, "out", at::kCUDA);
  mlv::check_tensor(text, "text", at::kCUDA);
  mlv::check_tensor(video, "video", at::kCUDA);
  mlv::check_index(code, "src_index", at::kCUDA);
  mlv::check_merge(out, "out", code, row_bytes);
  mlv::check_merge(text, "text", code, row_bytes);
  const int64_t num_video = mlv::video_rows(video, row_bytes, "video");
  c10::cuda::CUDAGuard guard(out.device());
  check_launch(mlv_merge_rows(out.data_ptr(), text.data_ptr(), video.data_ptr(),
                              code.data_ptr<int64_t>(), code.numel(), num_video, row_bytes,
                              at::cuda::getCurrentCUDAStream()),
               "mlv_merge_rows");
}

void merge_rows_backward(at::Tensor grad_text, at::Tensor grad_video, at::Tensor grad_out,
                         at::Tensor code, int64_t row_bytes) {
  mlv::check_tensor(grad_text, "grad_text", at::kCUDA);
  mlv::check_tensor(grad_video, "grad_video", at::kCUDA);
  mlv::check_tensor(grad_out, "grad_out", at::kCUDA);
  mlv::check_index(code, "src_index", at::kCUDA);
  mlv::check_merge(grad_text, "grad_text", code, row_bytes);
  mlv::check_merge(grad_out, "grad_out", code, row_bytes);
  const int64_t num_video = mlv::video_rows(grad_video, row_bytes, "grad_video");
  c10::cuda::CUDAGuard guard(grad_out.device());
  check_launch(mlv_merge_rows_backward(grad_text.data_ptr(), grad_video.data_ptr(),
                                       grad_out.data_ptr(), code.data_ptr<int64_t>(),
                                       code.numel(), num_video, row_bytes,
                                       at::cuda::getCurrentCUDAStream()),
               "mlv_merge_rows_backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA row-copy kernels for CP shard / unshard / embedding merge";
  m.def("gather_rows", &gather_rows, "dst row (o, i) = src row (o, index[i]), -1 -> pad");
  m.def("merge_rows", &merge_rows, "fused text/video merge into a padded shard");
  m.def("merge_rows_backward", &merge_rows_backward, "grads of merge_rows");
}
