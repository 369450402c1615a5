// CUDA kernels of the ai.kosmos ops (specs: plugins/src/lib.rs), with plain C entry points so
// they can be tested and timed without TensorRT (scripts/bench/cuda_kernels.py loads them
// with ctypes). All pointers are device pointers; each call only enqueues on `stream`.
// Return value: 0, or a cudaError_t from the launch.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// XPos on x [b, h, s, d] (d even) at positions [b, s]; y may alias x.
int kosmos_xpos_f32(const float* x, const int64_t* positions, float* y, int b, int h, int s, int d,
                    float theta, float scale_base, float centre, int downscale, cudaStream_t stream);
int kosmos_xpos_f16(const __half* x, const int64_t* positions, __half* y, int b, int h, int s,
                    int d, float theta, float scale_base, float centre, int downscale,
                    cudaStream_t stream);
// Same with int32 positions (TensorRT may hand the plugin int32 indices).
int kosmos_xpos_f32_i32(const float* x, const int32_t* positions, float* y, int b, int h, int s,
                        int d, float theta, float scale_base, float centre, int downscale,
                        cudaStream_t stream);
int kosmos_xpos_f16_i32(const __half* x, const int32_t* positions, __half* y, int b, int h, int s,
                        int d, float theta, float scale_base, float centre, int downscale,
                        cudaStream_t stream);

// LayerNorm(GELU(x)) over rows of f features: x [rows, f], gamma/beta [f], y [rows, f].
int kosmos_subln_gelu_f32(const float* x, const float* gamma, const float* beta, float* y,
                          int rows, int f, float epsilon, cudaStream_t stream);
int kosmos_subln_gelu_f16(const __half* x, const __half* gamma, const __half* beta, __half* y,
                          int rows, int f, float epsilon, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
