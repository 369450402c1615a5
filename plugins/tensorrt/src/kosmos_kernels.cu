// CUDA kernels of the ai.kosmos ops; math as in plugins/src/reference.rs (float32 tables,
// float32 accumulation for float16 data).
#include "kosmos_kernels.h"

namespace {

__device__ inline float to_f32(float v) { return v; }
__device__ inline float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ inline T from_f32(float v);
template <> __device__ inline float from_f32<float>(float v) { return v; }
template <> __device__ inline __half from_f32<__half>(float v) { return __float2half(v); }

// One thread per (row of b*h*s, pair i): the pair's rotation and scale are computed in place.
template <typename T, typename P>
__global__ void xpos_kernel(const T* __restrict__ x, const P* __restrict__ positions, T* y, int b,
                            int h, int s, int d, float theta, float scale_base, float centre,
                            int downscale) {
  const int half = d / 2;
  const long long total = (long long)b * h * s * half;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int i = (int)(idx % half);
  const long long row = idx / half;  // (bi * h + hi) * s + si
  const int si = (int)(row % s);
  const int bi = (int)(row / ((long long)s * h));
  const float t = (float)positions[(long long)bi * s + si];
  const float inv_freq = 1.0f / powf(theta, (float)i / (float)half);
  const float zeta = ((float)(2 * i) + 0.4f * (float)d) / (1.4f * (float)d);
  float scale = powf(zeta, (t - centre) / scale_base);
  if (downscale) scale = 1.0f / scale;
  float sn, cs;
  sincosf(t * inv_freq, &sn, &cs);
  cs *= scale;
  sn *= scale;
  const long long off = row * d + 2 * i;
  const float x0 = to_f32(x[off]), x1 = to_f32(x[off + 1]);
  y[off] = from_f32<T>(x0 * cs - x1 * sn);
  y[off + 1] = from_f32<T>(x1 * cs + x0 * sn);
}

template <typename T, typename P>
int launch_xpos(const T* x, const P* positions, T* y, int b, int h, int s, int d, float theta,
                float scale_base, float centre, int downscale, cudaStream_t stream) {
  if (d % 2 != 0) return (int)cudaErrorInvalidValue;
  const long long total = (long long)b * h * s * (d / 2);
  if (total == 0) return 0;
  const int threads = 256;
  const unsigned blocks = (unsigned)((total + threads - 1) / threads);
  xpos_kernel<T, P><<<blocks, threads, 0, stream>>>(x, positions, y, b, h, s, d, theta, scale_base,
                                                    centre, downscale);
  return (int)cudaGetLastError();
}

// Block-wide sum over blockDim.x threads (a multiple of 32, at most 1024).
__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = threadIdx.x < warps ? shared[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  return shared[0];
}

__device__ inline float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

// One block per row: GELU, then mean and (two-pass) variance, then the affine normalisation.
template <typename T>
__global__ void subln_gelu_kernel(const T* __restrict__ x, const T* __restrict__ gamma,
                                  const T* __restrict__ beta, T* y, int f, float epsilon) {
  __shared__ float shared[32];
  const T* xr = x + (long long)blockIdx.x * f;
  T* yr = y + (long long)blockIdx.x * f;
  float sum = 0.0f;
  for (int j = threadIdx.x; j < f; j += blockDim.x) sum += gelu(to_f32(xr[j]));
  const float mean = block_sum(sum, shared) / (float)f;
  float sq = 0.0f;
  for (int j = threadIdx.x; j < f; j += blockDim.x) {
    const float c = gelu(to_f32(xr[j])) - mean;
    sq += c * c;
  }
  const float inv = rsqrtf(block_sum(sq, shared) / (float)f + epsilon);
  for (int j = threadIdx.x; j < f; j += blockDim.x) {
    const float g = gelu(to_f32(xr[j]));
    yr[j] = from_f32<T>((g - mean) * inv * to_f32(gamma[j]) + to_f32(beta[j]));
  }
}

template <typename T>
int launch_subln(const T* x, const T* gamma, const T* beta, T* y, int rows, int f, float epsilon,
                 cudaStream_t stream) {
  if (rows == 0 || f == 0) return 0;
  int threads = 32;
  while (threads < f && threads < 1024) threads *= 2;
  subln_gelu_kernel<T><<<rows, threads, 0, stream>>>(x, gamma, beta, y, f, epsilon);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

int kosmos_xpos_f32(const float* x, const int64_t* p, float* y, int b, int h, int s, int d,
                    float theta, float scale_base, float centre, int downscale,
                    cudaStream_t stream) {
  return launch_xpos(x, p, y, b, h, s, d, theta, scale_base, centre, downscale, stream);
}
int kosmos_xpos_f16(const __half* x, const int64_t* p, __half* y, int b, int h, int s, int d,
                    float theta, float scale_base, float centre, int downscale,
                    cudaStream_t stream) {
  return launch_xpos(x, p, y, b, h, s, d, theta, scale_base, centre, downscale, stream);
}
int kosmos_xpos_f32_i32(const float* x, const int32_t* p, float* y, int b, int h, int s, int d,
                        float theta, float scale_base, float centre, int downscale,
                        cudaStream_t stream) {
  return launch_xpos(x, p, y, b, h, s, d, theta, scale_base, centre, downscale, stream);
}
int kosmos_xpos_f16_i32(const __half* x, const int32_t* p, __half* y, int b, int h, int s, int d,
                        float theta, float scale_base, float centre, int downscale,
                        cudaStream_t stream) {
  return launch_xpos(x, p, y, b, h, s, d, theta, scale_base, centre, downscale, stream);
}
int kosmos_subln_gelu_f32(const float* x, const float* gamma, const float* beta, float* y,
                          int rows, int f, float epsilon, cudaStream_t stream) {
  return launch_subln(x, gamma, beta, y, rows, f, epsilon, stream);
}
int kosmos_subln_gelu_f16(const __half* x, const __half* gamma, const __half* beta, __half* y,
                          int rows, int f, float epsilon, cudaStream_t stream) {
  return launch_subln(x, gamma, beta, y, rows, f, epsilon, stream);
}

}  // extern "C"
