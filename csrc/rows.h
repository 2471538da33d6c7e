// Row-copy kernels for context-parallel sharding: C interface shared by rows.cu and rows_cuda.cpp.
//
// Every op moves whole rows of `row_bytes` contiguous bytes, so one code path serves every dtype.
// A tensor is seen as rows (o, j), o in [0, n_outer), j in [0, n); row (o, j) starts at byte
//   (j / chunk_len) * chunk_stride + o * outer_stride + (j % chunk_len) * row_bytes
// which describes both a plain [outer, n, row] tensor (chunk_len = n, chunk_stride = 0) and a
// rank-major gathered [cp, outer, s_local, row] tensor (chunk_len = s_local).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {

typedef struct MlvRowLayout {
  int64_t chunk_len;
  int64_t chunk_stride;
  int64_t outer_stride;
} MlvRowLayout;

// Fill value of padding rows: one element's bytes (elem_size in 1, 2, 4, 8, 16) repeated; all zero
// bytes when is_zero.
typedef struct MlvPad {
  uint8_t bytes[16];
  int32_t elem_size;
  int32_t is_zero;
} MlvPad;

// dst row (o, i) = src row (o, index[i]) for i < n_out; index < 0 or >= n_src gives a pad row.
cudaError_t mlv_gather_rows(void* dst, const void* src, const int64_t* index, int64_t n_outer,
                            int64_t n_out, int64_t n_src, int64_t row_bytes, MlvRowLayout dst_layout,
                            MlvRowLayout src_layout, MlvPad pad, cudaStream_t stream);

// out row r = video row code[r] (code >= 0), text row r (code == -1), zeros otherwise
// (code == -2, and any code outside [-2, num_video) so that a bad index never reads out of bounds).
cudaError_t mlv_merge_rows(void* out, const void* text, const void* video, const int64_t* code,
                           int64_t n_rows, int64_t num_video, int64_t row_bytes, cudaStream_t stream);

// grad_text row r = grad_out row r where code[r] == -1, else zeros; grad_video = zeros except
// grad_video row code[r] = grad_out row r for code[r] in [0, num_video). Codes must not repeat a
// video row (true by construction: a video row sits at one position of one sequence).
cudaError_t mlv_merge_rows_backward(void* grad_text, void* grad_video, const void* grad_out,
                                    const int64_t* code, int64_t n_rows, int64_t num_video,
                                    int64_t row_bytes, cudaStream_t stream);

}  // extern "C"
