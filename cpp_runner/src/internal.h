// What the library's source files share (internal: not installed). metadata.cpp reads and checks a file's
// metadata and graph, plan.cpp builds plans (the port of plan.py), step.cpp is one plan row's update (on the host,
// and as an ONNX graph for the provider's device), sampler.cpp runs plans with ONNX Runtime or OpenVINO.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "ddpm/sampler.h"
#include "openvino_network.h"
#include "parse.h"

// The float32 step arithmetic must round as numpy's does (see -ffp-contract=off in CMakeLists.txt).
#if defined(__FAST_MATH__)
#error "the ddpm_sampler library must not be compiled with -ffast-math: the samples would no longer match numpy's"
#endif

namespace ddpm::internal {

bool one_of(const std::string& v, std::initializer_list<const char*> allowed);
inline std::string one_line(const std::string& s) { return printable(s, 500); }
std::string str(double v);  // for a message: 2, 0.5, 1e-20, nan, inf

// Bounds on what a file may ask for, checked before anything is allocated from it: T up to 10^5 timesteps, images
// of up to 2^24 floats (e.g. 4 x 2048 x 2048), up to 2^20 classes.
constexpr int64_t kMaxTimesteps = 100000, kMaxImageFloats = int64_t(1) << 24, kMaxClasses = int64_t(1) << 20;
constexpr int64_t kMaxCorrectorSteps = 1000;

// ---- metadata.cpp
std::map<std::string, std::string> read_metadata_props(const std::string& path);
ModelInfo read_metadata(const std::map<std::string, std::string>& props, const std::string& path);
// One input or output of the graph as ONNX Runtime reports it; dims of -1 are symbolic or unknown.
struct Port {
  std::string name;
  bool tensor = false;
  ONNXTensorElementDataType dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
};

struct Ports {
  std::map<std::string, Port> inputs;
  std::vector<Port> outputs;
};
Ports session_ports(const Ort::Session& session);
Ports openvino_ports(const OpenVinoNetwork& network);
void check_graph(Ports ports, const ModelInfo& m, const std::string& path);

// ---- step.cpp
constexpr int64_t kCoefficients = 11;  // a row's coefficients in the step graph's input c, before its M weights
void row_coefficients(const Plan& p, const Step& s, float* c);
void step_mean(const Plan& p, const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out,
               float* x0_out, const std::vector<const float*>& earlier);
void step_noise(const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out, const float* z);
const float* guide(const float* out, int64_t b, int64_t chw, int64_t out_chw, float s, float* into);
std::string step_graph(bool learned, bool split_output, int64_t memory, bool guided);

}  // namespace ddpm::internal
