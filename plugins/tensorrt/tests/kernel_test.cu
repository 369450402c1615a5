// The CUDA kernels against a CPU reference of the same math (plugins/src/reference.rs) on random
// inputs: fp32 within 1e-4 absolute, fp16 within 1e-3 relative to the largest reference value
// (ai.kosmos outputs are O(1)–O(30)). Exit status 0 when every case passes.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kosmos_kernels.h"

#define CHECK(x)                                                              \
  do {                                                                        \
    cudaError_t e = (cudaError_t)(x);                                         \
    if (e != cudaSuccess) {                                                   \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

static void xpos_ref(const std::vector<float>& x, const std::vector<int64_t>& pos, std::vector<float>& y,
                     int b, int h, int s, int d, float theta, float base, float centre, bool down) {
  int half = d / 2;
  for (int bi = 0; bi < b; ++bi)
    for (int si = 0; si < s; ++si) {
      float t = (float)pos[bi * s + si];
      for (int i = 0; i < half; ++i) {
        float inv = 1.0f / std::pow(theta, (float)i / (float)half);
        float zeta = ((float)(2 * i) + 0.4f * d) / (1.4f * d);
        float sc = std::pow(zeta, (t - centre) / base);
        if (down) sc = 1.0f / sc;
        float c = std::cos(t * inv) * sc, sn = std::sin(t * inv) * sc;
        for (int hi = 0; hi < h; ++hi) {
          size_t off = (((size_t)bi * h + hi) * s + si) * d + 2 * i;
          y[off] = x[off] * c - x[off + 1] * sn;
          y[off + 1] = x[off + 1] * c + x[off] * sn;
        }
      }
    }
}

static void subln_ref(const std::vector<float>& x, const std::vector<float>& g, const std::vector<float>& bt,
                      std::vector<float>& y, int rows, int f, float eps) {
  std::vector<double> v(f);
  for (int r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int j = 0; j < f; ++j) {
      double a = x[(size_t)r * f + j];
      v[j] = 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0)));
      mean += v[j];
    }
    mean /= f;
    for (int j = 0; j < f; ++j) var += (v[j] - mean) * (v[j] - mean);
    var /= f;
    for (int j = 0; j < f; ++j) y[(size_t)r * f + j] = (float)((v[j] - mean) / std::sqrt(var + eps) * g[j] + bt[j]);
  }
}

template <typename T> static std::vector<T> to_dev_type(const std::vector<float>& v);
template <> std::vector<float> to_dev_type<float>(const std::vector<float>& v) { return v; }
template <> std::vector<__half> to_dev_type<__half>(const std::vector<float>& v) {
  std::vector<__half> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = __float2half(v[i]);
  return o;
}
static float back(float v) { return v; }
static float back(__half v) { return __half2float(v); }

template <typename T> static T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  CHECK(cudaMalloc(&p, v.size() * sizeof(T) + 1));
  CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

static bool report(const char* what, const std::vector<float>& got, const std::vector<float>& want, bool half) {
  double worst = 0, mag = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    worst = std::fmax(worst, std::fabs(got[i] - want[i]));
    mag = std::fmax(mag, std::fabs(want[i]));
  }
  bool ok = half ? worst <= 1e-3 * std::fmax(mag, 1.0) : worst <= 1e-4;
  std::printf("%-5s %-40s max |diff| %.2e (|ref| <= %.1f)\n", ok ? "ok" : "FAIL", what, worst, mag);
  return ok;
}

template <typename T>
static bool run_xpos(int b, int h, int s, int d, int64_t start, bool down, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<float> x((size_t)b * h * s * d);
  for (auto& v : x) v = u(rng);
  std::vector<int64_t> pos((size_t)b * s);
  for (int bi = 0; bi < b; ++bi)
    for (int si = 0; si < s; ++si) pos[bi * s + si] = start + 37 * bi + si;
  auto xd = to_dev_type<T>(x);
  std::vector<float> xin(x.size());
  for (size_t i = 0; i < x.size(); ++i) xin[i] = back(xd[i]);  // what the kernel sees
  std::vector<float> want(x.size());
  xpos_ref(xin, pos, want, b, h, s, d, 10000.f, 512.f, 1024.f, down);
  T* dx = upload(xd);
  int64_t* dp = upload(pos);
  T* dy = nullptr;
  CHECK(cudaMalloc(&dy, xd.size() * sizeof(T) + 1));
  int rc = sizeof(T) == 2 ? kosmos_xpos_f16((const __half*)dx, dp, (__half*)dy, b, h, s, d, 10000.f, 512.f, 1024.f, down, 0)
                          : kosmos_xpos_f32((const float*)dx, dp, (float*)dy, b, h, s, d, 10000.f, 512.f, 1024.f, down, 0);
  CHECK(rc);
  CHECK(cudaDeviceSynchronize());
  std::vector<T> yd(xd.size());
  CHECK(cudaMemcpy(yd.data(), dy, yd.size() * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> got(yd.size());
  for (size_t i = 0; i < yd.size(); ++i) got[i] = back(yd[i]);
  cudaFree(dx); cudaFree(dp); cudaFree(dy);
  char what[128];
  std::snprintf(what, sizeof what, "xpos %s %dx%dx%dx%d from %lld %s", sizeof(T) == 2 ? "f16" : "f32", b, h, s, d,
                (long long)start, down ? "k" : "q");
  return report(what, got, want, sizeof(T) == 2);
}

template <typename T>
static bool run_subln(int rows, int f, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  std::vector<float> x((size_t)rows * f), g(f), bt(f);
  for (auto& v : x) v = u(rng);
  for (auto& v : g) v = 1.f + u(rng) / 6.f;
  for (auto& v : bt) v = u(rng) / 3.f;
  auto xd = to_dev_type<T>(x), gd = to_dev_type<T>(g), bd = to_dev_type<T>(bt);
  std::vector<float> xin(x.size()), gin(f), bin(f);
  for (size_t i = 0; i < x.size(); ++i) xin[i] = back(xd[i]);
  for (int i = 0; i < f; ++i) { gin[i] = back(gd[i]); bin[i] = back(bd[i]); }
  std::vector<float> want(x.size());
  subln_ref(xin, gin, bin, want, rows, f, 1e-5f);
  T *dx = upload(xd), *dg = upload(gd), *db = upload(bd), *dy = nullptr;
  CHECK(cudaMalloc(&dy, xd.size() * sizeof(T) + 1));
  int rc = sizeof(T) == 2 ? kosmos_subln_gelu_f16((const __half*)dx, (const __half*)dg, (const __half*)db, (__half*)dy, rows, f, 1e-5f, 0)
                          : kosmos_subln_gelu_f32((const float*)dx, (const float*)dg, (const float*)db, (float*)dy, rows, f, 1e-5f, 0);
  CHECK(rc);
  CHECK(cudaDeviceSynchronize());
  std::vector<T> yd(xd.size());
  CHECK(cudaMemcpy(yd.data(), dy, yd.size() * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> got(yd.size());
  for (size_t i = 0; i < yd.size(); ++i) got[i] = back(yd[i]);
  cudaFree(dx); cudaFree(dg); cudaFree(db); cudaFree(dy);
  char what[128];
  std::snprintf(what, sizeof what, "subln_gelu %s %dx%d", sizeof(T) == 2 ? "f16" : "f32", rows, f);
  return report(what, got, want, sizeof(T) == 2);
}

int main() {
  std::mt19937 rng(7);
  bool ok = true;
  const int shapes[][4] = {{1, 1, 1, 2}, {2, 3, 5, 6}, {1, 4, 7, 10}, {3, 32, 17, 64}, {2, 5, 9, 34}};
  const int64_t starts[] = {0, 300, 1990};
  for (auto& sh : shapes)
    for (int64_t st : starts)
      for (int down = 0; down < 2; ++down) {
        ok &= run_xpos<float>(sh[0], sh[1], sh[2], sh[3], st, down, rng);
        ok &= run_xpos<__half>(sh[0], sh[1], sh[2], sh[3], st, down, rng);
      }
  const int rows_f[][2] = {{1, 1}, {3, 7}, {5, 64}, {2, 257}, {17, 33}, {64, 8192}};
  for (auto& rf : rows_f) {
    ok &= run_subln<float>(rf[0], rf[1], rng);
    ok &= run_subln<__half>(rf[0], rf[1], rng);
  }
  std::printf(ok ? "all kernel checks passed\n" : "KERNEL CHECKS FAILED\n");
  return ok ? 0 : 1;
}
