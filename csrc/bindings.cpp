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

// EpilogueArgs as Python sees it: the same fields as proxykd::EpilogueArgs, pointers as ints.
struct PyEpilogueArgs {
  std::uintptr_t S = 0, P = 0, labels = 0, c_nll = 0, c_kd = 0, nll = 0, kd = 0;
  int64_t C = 0, V = 0, ldS = 0, ldP = 0;
  float temperature = 1.0f;
  bool need_grad = false;
};

void kd_epilogue(const PyEpilogueArgs& a, std::uintptr_t stream) {
  if (a.temperature <= 0.0f) throw std::invalid_argument("temperature must be > 0");
  if (a.S == 0 || a.labels == 0 || a.c_nll == 0 || a.nll == 0) throw std::invalid_argument("null S/labels/c_nll/nll");
  if (a.P != 0 && (a.c_kd == 0 || a.kd == 0)) throw std::invalid_argument("a proxy needs c_kd and kd");
  proxykd::EpilogueArgs args;
  args.S = reinterpret_cast<float*>(a.S);
  args.P = reinterpret_cast<const float*>(a.P);
  args.labels = reinterpret_cast<const int64_t*>(a.labels);
  args.c_nll = reinterpret_cast<const float*>(a.c_nll);
  args.c_kd = reinterpret_cast<const float*>(a.c_kd);
  args.nll = reinterpret_cast<float*>(a.nll);
  args.kd = reinterpret_cast<float*>(a.kd);
  args.C = a.C;
  args.V = a.V;
  args.ldS = a.ldS;
  args.ldP = a.ldP;
  args.temperature = a.temperature;
  args.need_grad = a.need_grad;
  check(proxykd::launch_kd_epilogue(args, reinterpret_cast<cudaStream_t>(stream)), "kd_epilogue launch");
}

}  // namespace

PYBIND11_MODULE(_cuda_ext, m) {
  m.doc() = "proxykd_fast CUDA kernels (raw-pointer interface, no torch headers)";
  m.def("device_count", &device_count, "Number of CUDA devices visible to the runtime (0 when none)");
  py::class_<PyEpilogueArgs>(m, "EpilogueArgs", "Arguments of kd_epilogue (pointers as ints), by name")
      .def(py::init<>())
      .def_readwrite("S", &PyEpilogueArgs::S)
      .def_readwrite("P", &PyEpilogueArgs::P)
      .def_readwrite("labels", &PyEpilogueArgs::labels)
      .def_readwrite("c_nll", &PyEpilogueArgs::c_nll)
      .def_readwrite("c_kd", &PyEpilogueArgs::c_kd)
      .def_readwrite("nll", &PyEpilogueArgs::nll)
      .def_readwrite("kd", &PyEpilogueArgs::kd)
      .def_readwrite("C", &PyEpilogueArgs::C)
      .def_readwrite("V", &PyEpilogueArgs::V)
      .def_readwrite("ldS", &PyEpilogueArgs::ldS)
      .def_readwrite("ldP", &PyEpilogueArgs::ldP)
      .def_readwrite("temperature", &PyEpilogueArgs::temperature)
      .def_readwrite("need_grad", &PyEpilogueArgs::need_grad);
  m.def("kd_epilogue", &kd_epilogue, "Fused NLL + T^2 KL(p||q_T) row epilogue; dlogits in place over S",
        py::arg("args"), py::arg("stream"));
}
