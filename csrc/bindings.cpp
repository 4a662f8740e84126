// pybind11 bindings of the CUDA kernels. Tensors cross as raw device pointers (ints) so the
// extension needs no torch headers and builds against any torch, CPU wheels included.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kd_epilogue.cuh"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error of a machine without a driver
    return 0;
  }
  return n;
}

void kd_epilogue(std::uintptr_t S, std::uintptr_t P, std::uintptr_t labels, std::uintptr_t c_nll,
                 std::uintptr_t c_kd, std::uintptr_t nll, std::uintptr_t kd, int64_t C, int64_t V, int64_t ldS,
                 int64_t ldP, float temperature, bool need_grad, std::uintptr_t stream) {
  if (temperature <= 0.0f) throw std::invalid_argument("temperature must be > 0");
  proxykd::EpilogueArgs a{reinterpret_cast<float*>(S),         reinterpret_cast<const float*>(P),
                          reinterpret_cast<const int64_t*>(labels), reinterpret_cast<const float*>(c_nll),
                          reinterpret_cast<const float*>(c_kd), reinterpret_cast<float*>(nll),
                          reinterpret_cast<float*>(kd),         C,
                          V,                                    ldS,
                          ldP,                                  temperature,
                          need_grad};
  check(proxykd::launch_kd_epilogue(a, reinterpret_cast<cudaStream_t>(stream)), "kd_epilogue launch");
}

}  // namespace

PYBIND11_MODULE(_cuda_ext, m) {
  m.doc() = "proxykd_fast CUDA kernels (raw-pointer interface, no torch headers)";
  m.def("device_count", &device_count, "Number of CUDA devices visible to the runtime (0 when none)");
  m.def("kd_epilogue", &kd_epilogue, "Fused NLL + T^2 KL(p||q_T) row epilogue; dlogits in place over S",
        py::arg("S"), py::arg("P"), py::arg("labels"), py::arg("c_nll"), py::arg("c_kd"), py::arg("nll"),
        py::arg("kd"), py::arg("C"), py::arg("V"), py::arg("ldS"), py::arg("ldP"), py::arg("temperature"),
        py::arg("need_grad"), py::arg("stream"));
}
