// Fused row epilogue of the chunked Proxy-KD loss (CUDA, no torch headers).
//
// One block per row of a chunk of fp32 logits S [C, V] (student) and P [C, V] (proxy).
// Pass 1 merges online-softmax statistics of s, s/T and p/T; pass 2 computes the NLL and
// T^2 * KL(p || q_T) and, when asked, overwrites S with d(loss)/d(logits):
//   c_nll * (softmax(s) - onehot(y)) + c_kd * T * (softmax(s/T) - softmax(p/T)).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace proxykd {

struct EpilogueArgs {
  float* S;              // [C, ldS] student logits in, dlogits out
  const float* P;        // [C, ldP] proxy logits, or nullptr for plain NLL
  const int64_t* labels; // [C], already in range
  const float* c_nll;    // [C] gradient coefficient of the NLL term
  const float* c_kd;     // [C] gradient coefficient of the KD term
  float* nll;            // [C] out
  float* kd;             // [C] out, T^2 * KL (0 when P is nullptr)
  int64_t C, V, ldS, ldP;
  float temperature;
  bool need_grad;
};

// Launch on `stream`; returns the launch error (cudaSuccess when queued).
cudaError_t launch_kd_epilogue(const EpilogueArgs& args, cudaStream_t stream);

}  // namespace proxykd
