#include "kd_epilogue.cuh"

#include <cfloat>

namespace proxykd {
namespace {

constexpr int kThreads = 512;

// Online softmax statistics: running max and sum of exp(x - max).
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.m == -FLT_MAX) return b;
  if (b.m == -FLT_MAX) return a;
  float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum push(MaxSum a, float x) {
  if (x <= a.m) return {a.m, a.s + expf(x - a.m)};
  return {x, a.s * expf(a.m - x) + 1.0f};
}

template <int N>
__device__ void block_merge(MaxSum (&v)[N], MaxSum (*shared)[N]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    for (int off = 16; off > 0; off >>= 1) {
      MaxSum o{__shfl_xor_sync(0xffffffffu, v[i].m, off), __shfl_xor_sync(0xffffffffu, v[i].s, off)};
      v[i] = merge(v[i], o);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) shared[warp][i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] = lane < (kThreads >> 5) ? shared[lane][i] : MaxSum{-FLT_MAX, 0.0f};
      for (int off = 16; off > 0; off >>= 1) {
        MaxSum o{__shfl_xor_sync(0xffffffffu, v[i].m, off), __shfl_xor_sync(0xffffffffu, v[i].s, off)};
        v[i] = merge(v[i], o);
      }
      if (lane == 0) shared[0][i] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = shared[0][i];
  __syncthreads();
}

__device__ float block_sum(float x, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < (kThreads >> 5) ? shared[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (lane == 0) shared[0] = x;
  }
  __syncthreads();
  x = shared[0];
  __syncthreads();
  return x;
}

// The label logit must be read before pass 2 overwrites S; a tiny gather kernel does it first.
__global__ void gather_label_logit(const float* S, int64_t ldS, const int64_t* labels, float* out, int64_t C) {
  int64_t row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row < C) out[row] = S[row * ldS + labels[row]];
}

__global__ void __launch_bounds__(kThreads) kd_epilogue_main(EpilogueArgs a, const float* label_logit) {
  __shared__ MaxSum stats[kThreads >> 5][3];
  __shared__ float sums[kThreads >> 5];
  const int64_t row = blockIdx.x;
  float* s = a.S + row * a.ldS;
  const float* p = a.P ? a.P + row * a.ldP : nullptr;
  const float inv_t = 1.0f / a.temperature;

  MaxSum v[3] = {{-FLT_MAX, 0.0f}, {-FLT_MAX, 0.0f}, {-FLT_MAX, 0.0f}};
  for (int64_t j = threadIdx.x; j < a.V; j += kThreads) {
    float x = s[j];
    v[0] = push(v[0], x);
    v[1] = push(v[1], x * inv_t);
    if (p) v[2] = push(v[2], p[j] * inv_t);
  }
  block_merge<3>(v, stats);
  const float lse_s = v[0].m + logf(v[0].s);
  const float lse_t = v[1].m + logf(v[1].s);
  const float lse_p = p ? v[2].m + logf(v[2].s) : 0.0f;
  const int64_t y = a.labels[row];
  const float cn = a.c_nll[row], ck = a.c_kd[row] * a.temperature;

  float kl = 0.0f;
  for (int64_t j = threadIdx.x; j < a.V; j += kThreads) {
    float x = s[j];
    float g = 0.0f;
    if (a.need_grad) g = cn * (expf(x - lse_s) - (j == y ? 1.0f : 0.0f));
    if (p) {
      float log_p = p[j] * inv_t - lse_p;
      float log_q = x * inv_t - lse_t;
      float pj = expf(log_p);
      kl += pj > 0.0f ? pj * (log_p - log_q) : 0.0f;
      if (a.need_grad) g += ck * (expf(log_q) - pj);
    }
    if (a.need_grad) s[j] = g;
  }
  kl = block_sum(kl, sums);
  if (threadIdx.x == 0) {
    a.nll[row] = lse_s - label_logit[row];
    a.kd[row] = p ? kl * a.temperature * a.temperature : 0.0f;
  }
}

}  // namespace

cudaError_t launch_kd_epilogue(const EpilogueArgs& args, cudaStream_t stream) {
  if (args.C == 0) return cudaSuccess;
  // Scratch for the label logits lives in the nll output: read first, then overwritten per row.
  gather_label_logit<<<(unsigned)((args.C + 255) / 256), 256, 0, stream>>>(args.S, args.ldS, args.labels, args.nll,
                                                                         args.C);
  kd_epilogue_main<<<(unsigned)args.C, kThreads, 0, stream>>>(args, args.nll);
  return cudaGetLastError();
}

}  // namespace proxykd
