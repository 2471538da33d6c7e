// CUDA row-copy kernels: CP shard gather, unshard + unpad, and the fused text/video embedding merge
// (forward and backward). Only CUDA headers here, so `nvcc -c` works without ATen's CUDA headers;
// the torch binding lives in rows_cuda.cpp.
//
// One block walks rows with a grid stride; its threads copy a row as vectors of V (16 bytes when
// both pointers, the row length and the strides allow it, else 8/4/2/1).
#include <cuda_runtime.h>
#include <stdint.h>

#include "rows.h"

namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

__device__ __forceinline__ int64_t row_offset(const MlvRowLayout& l, int64_t row_bytes, int64_t o,
                                              int64_t j) {
  return (j / l.chunk_len) * l.chunk_stride + o * l.outer_stride + (j % l.chunk_len) * row_bytes;
}

template <typename V>
__device__ __forceinline__ void copy_row(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src,
                                         int64_t n_vec) {
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  for (int64_t t = threadIdx.x; t < n_vec; t += blockDim.x) d[t] = s[t];
}

template <typename V>
__device__ __forceinline__ void fill_row(uint8_t* __restrict__ dst, V value, int64_t n_vec) {
  V* d = reinterpret_cast<V*>(dst);
  for (int64_t t = threadIdx.x; t < n_vec; t += blockDim.x) d[t] = value;
}

template <typename V>
__device__ __forceinline__ V zero_vec() {
  V v;
  uint8_t* b = reinterpret_cast<uint8_t*>(&v);
#pragma unroll
  for (int i = 0; i < (int)sizeof(V); ++i) b[i] = 0;
  return v;
}

template <typename V>
__global__ void gather_rows_kernel(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src,
                                   const int64_t* __restrict__ index, int64_t n_outer,
                                   int64_t n_out, int64_t n_src, int64_t row_bytes,
                                   MlvRowLayout dst_layout, MlvRowLayout src_layout, MlvPad pad) {
  // sizeof(V) is a multiple of the element size (the host ensures it), so a pad vector is the
  // first sizeof(V) bytes of the repeated pattern.
  V pad_vec;
  {
    uint8_t* b = reinterpret_cast<uint8_t*>(&pad_vec);
#pragma unroll
    for (int i = 0; i < (int)sizeof(V); ++i) b[i] = pad.is_zero ? 0 : pad.bytes[i % 16];
  }
  const int64_t n_vec = row_bytes / (int64_t)sizeof(V);
  const int64_t n_rows = n_outer * n_out;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t o = r / n_out, i = r % n_out;
    uint8_t* d = dst + row_offset(dst_layout, row_bytes, o, i);
    const int64_t k = index[i];
    if (k >= 0 && k < n_src) {
      copy_row<V>(d, src + row_offset(src_layout, row_bytes, o, k), n_vec);
    } else {
      fill_row<V>(d, pad_vec, n_vec);
    }
  }
}

template <typename V>
__global__ void merge_rows_kernel(uint8_t* __restrict__ out, const uint8_t* __restrict__ text,
                                  const uint8_t* __restrict__ video, const int64_t* __restrict__ code,
                                  int64_t n_rows, int64_t num_video, int64_t row_bytes) {
  const int64_t n_vec = row_bytes / (int64_t)sizeof(V);
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t k = code[r];
    uint8_t* d = out + r * row_bytes;
    if (k >= 0 && k < num_video) {
      copy_row<V>(d, video + k * row_bytes, n_vec);
    } else if (k == -1) {
      copy_row<V>(d, text + r * row_bytes, n_vec);
    } else {
      fill_row<V>(d, zero_vec<V>(), n_vec);
    }
  }
}

template <typename V>
__global__ void merge_rows_backward_kernel(uint8_t* __restrict__ grad_text,
                                           uint8_t* __restrict__ grad_video,
                                           const uint8_t* __restrict__ grad_out,
                                           const int64_t* __restrict__ code, int64_t n_rows,
                                           int64_t num_video, int64_t row_bytes) {
  const int64_t n_vec = row_bytes / (int64_t)sizeof(V);
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t k = code[r];
    const uint8_t* g = grad_out + r * row_bytes;
    uint8_t* gt = grad_text + r * row_bytes;
    if (k == -1) {
      copy_row<V>(gt, g, n_vec);
    } else {
      fill_row<V>(gt, zero_vec<V>(), n_vec);
    }
    // No atomics: a video row is named by at most one code, so this block is its only writer.
    if (k >= 0 && k < num_video) copy_row<V>(grad_video + k * row_bytes, g, n_vec);
  }
}

// Largest of 16/8/4/2/1 dividing every address and length in `bits`.
int vector_width(uint64_t bits) {
  int w = 16;
  while (w > 1 && (bits % (uint64_t)w) != 0) w /= 2;
  return w;
}

void launch_shape(int64_t n_rows, int64_t n_vec, dim3* grid, dim3* block) {
  int64_t threads = ((n_vec + 31) / 32) * 32;
  if (threads < 32) threads = 32;
  if (threads > kMaxThreads) threads = kMaxThreads;
  int64_t blocks = n_rows < kMaxBlocks ? n_rows : kMaxBlocks;
  *grid = dim3((unsigned)(blocks > 0 ? blocks : 1));
  *block = dim3((unsigned)threads);
}

template <typename V>
cudaError_t gather_rows_as(void* dst, const void* src, const int64_t* index, int64_t n_outer,
                           int64_t n_out, int64_t n_src, int64_t row_bytes, MlvRowLayout dst_layout,
                           MlvRowLayout src_layout, MlvPad pad, cudaStream_t stream) {
  dim3 grid, block;
  launch_shape(n_outer * n_out, row_bytes / (int64_t)sizeof(V), &grid, &block);
  gather_rows_kernel<V><<<grid, block, 0, stream>>>(
      static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), index, n_outer, n_out, n_src,
      row_bytes, dst_layout, src_layout, pad);
  return cudaGetLastError();
}

template <typename V>
cudaError_t merge_rows_as(void* out, const void* text, const void* video, const int64_t* code,
                          int64_t n_rows, int64_t num_video, int64_t row_bytes, cudaStream_t stream) {
  dim3 grid, block;
  launch_shape(n_rows, row_bytes / (int64_t)sizeof(V), &grid, &block);
  merge_rows_kernel<V><<<grid, block, 0, stream>>>(
      static_cast<uint8_t*>(out), static_cast<const uint8_t*>(text),
      static_cast<const uint8_t*>(video), code, n_rows, num_video, row_bytes);
  return cudaGetLastError();
}

template <typename V>
cudaError_t merge_rows_backward_as(void* grad_text, void* grad_video, const void* grad_out,
                                   const int64_t* code, int64_t n_rows, int64_t num_video,
                                   int64_t row_bytes, cudaStream_t stream) {
  dim3 grid, block;
  launch_shape(n_rows, row_bytes / (int64_t)sizeof(V), &grid, &block);
  merge_rows_backward_kernel<V><<<grid, block, 0, stream>>>(
      static_cast<uint8_t*>(grad_text), static_cast<uint8_t*>(grad_video),
      static_cast<const uint8_t*>(grad_out), code, n_rows, num_video, row_bytes);
  return cudaGetLastError();
}

#define MLV_DISPATCH_WIDTH(width, FN, ...)                       \
  switch (width) {                                               \
    case 16: return FN<uint4>(__VA_ARGS__);                      \
    case 8: return FN<uint2>(__VA_ARGS__);                       \
    case 4: return FN<uint32_t>(__VA_ARGS__);                    \
    case 2: return FN<uint16_t>(__VA_ARGS__);                    \
    default: return FN<uint8_t>(__VA_ARGS__);                    \
  }

}  // namespace

extern "C" cudaError_t mlv_gather_rows(void* dst, const void* src, const int64_t* index,
                                       int64_t n_outer, int64_t n_out, int64_t n_src,
                                       int64_t row_bytes, MlvRowLayout dst_layout,
                                       MlvRowLayout src_layout, MlvPad pad, cudaStream_t stream) {
  if (n_outer * n_out == 0 || row_bytes == 0) return cudaSuccess;
  uint64_t bits = (uint64_t)(uintptr_t)dst | (uint64_t)(uintptr_t)src | (uint64_t)row_bytes |
                  (uint64_t)dst_layout.chunk_stride | (uint64_t)dst_layout.outer_stride |
                  (uint64_t)src_layout.chunk_stride | (uint64_t)src_layout.outer_stride;
  int width = vector_width(bits);
  // A non-zero pad pattern repeats every elem_size bytes, so vectors must hold whole elements.
  if (!pad.is_zero && width < pad.elem_size) width = 1;
  MLV_DISPATCH_WIDTH(width, gather_rows_as, dst, src, index, n_outer, n_out, n_src, row_bytes,
                     dst_layout, src_layout, pad, stream)
}

extern "C" cudaError_t mlv_merge_rows(void* out, const void* text, const void* video,
                                      const int64_t* code, int64_t n_rows, int64_t num_video,
                                      int64_t row_bytes, cudaStream_t stream) {
  if (n_rows == 0 || row_bytes == 0) return cudaSuccess;
  uint64_t bits = (uint64_t)(uintptr_t)out | (uint64_t)(uintptr_t)text |
                  (uint64_t)(uintptr_t)video | (uint64_t)row_bytes;
  MLV_DISPATCH_WIDTH(vector_width(bits), merge_rows_as, out, text, video, code, n_rows, num_video,
                     row_bytes, stream)
}

extern "C" cudaError_t mlv_merge_rows_backward(void* grad_text, void* grad_video,
                                               const void* grad_out, const int64_t* code,
                                               int64_t n_rows, int64_t num_video, int64_t row_bytes,
                                               cudaStream_t stream) {
  if (num_video > 0 && row_bytes > 0) {
    cudaError_t err = cudaMemsetAsync(grad_video, 0, (size_t)(num_video * row_bytes), stream);
    if (err != cudaSuccess) return err;
  }
  if (n_rows == 0 || row_bytes == 0) return cudaSuccess;
  uint64_t bits = (uint64_t)(uintptr_t)grad_text | (uint64_t)(uintptr_t)grad_video |
                  (uint64_t)(uintptr_t)grad_out | (uint64_t)row_bytes;
  MLV_DISPATCH_WIDTH(vector_width(bits), merge_rows_backward_as, grad_text, grad_video, grad_out,
                     code, n_rows, num_video, row_bytes, stream)
}
