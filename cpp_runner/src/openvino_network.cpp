#include "openvino_network.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include "parse.h"

#ifdef DDPM_WITH_OPENVINO
#include <openvino/openvino.hpp>
#endif

namespace ddpm {

#ifdef DDPM_WITH_OPENVINO
namespace {

// Why this CPU computes bf16 fast (AMX or AVX512-BF16 among /proc/cpuinfo's flags, where OpenVINO lists BF16 too),
// or "": the test of export/openvino_engine.py's cpu_bf16.
std::string cpu_bf16(ov::Core& core) {
  const auto caps = core.get_property("CPU", ov::device::capabilities);
  if (std::find(caps.begin(), caps.end(), std::string("BF16")) == caps.end()) return "";
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    std::stringstream words(line.substr(line.find(':') + 1));
    std::vector<std::string> flags;
    for (std::string w; words >> w;) flags.push_back(w);
    const auto has = [&](const char* f) { return std::find(flags.begin(), flags.end(), f) != flags.end(); };
    return has("amx_bf16") ? "the CPU has AMX" : has("avx512_bf16") ? "the CPU has AVX512-BF16" : "";
  }
  return "";
}

int onnx_type(const ov::element::Type& t) {
  return t == ov::element::f32 ? 1 : t == ov::element::i64 ? 7 : t == ov::element::f16 ? 10 : t == ov::element::i32 ? 6
         : t == ov::element::f64 ? 11 : 0;
}

std::vector<TensorPort> ports(const std::vector<ov::Output<ov::Node>>& outputs) {
  std::vector<TensorPort> found;
  for (const auto& o : outputs) {
    TensorPort p{o.get_any_name(), onnx_type(o.get_element_type()), {}};
    for (const auto& d : o.get_partial_shape()) p.dims.push_back(d.is_static() ? d.get_length() : -1);
    found.push_back(p);
  }
  return found;
}

// Runs f; OpenVINO's exceptions become Error.
template <typename F>
auto openvino(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error("openvino: " + printable(e.what(), 300));
  }
}

}  // namespace

struct OpenVinoNetwork::Impl {
  ov::Core core;
  std::shared_ptr<ov::Model> model;
  ov::AnyMap config;
  std::string description;
  std::map<int64_t, ov::InferRequest> requests;  // by batch: the model compiled for that static batch
  ov::InferRequest& request(int64_t nb);          // that of nb images, compiled at its first use
};

OpenVinoNetwork::OpenVinoNetwork(const std::string& path, Precision precision, std::optional<int> threads)
    : impl_(std::make_unique<Impl>()) {
  openvino([&] {
    const std::string why = cpu_bf16(impl_->core);
    need(precision != Precision::Bf16 || !why.empty(),
         "precision bf16 needs a CPU with AVX512-BF16 or AMX, and this one has neither: use fp32 (or auto)");
    const bool bf16 = precision == Precision::Bf16 || (precision == Precision::Auto && !why.empty());
    impl_->description = std::string("OpenVINO CPU ") + (bf16 ? "bf16" : "fp32") + " (" +
                         (precision != Precision::Auto ? "as asked" : bf16 ? "auto: " + why
                          : "auto: the CPU has neither AVX512-BF16 nor AMX") + ")";
    try {
      impl_->model = impl_->core.read_model(path);
    } catch (const std::exception& e) {
      throw Error("cannot load " + path + " with OpenVINO: " + printable(e.what(), 300));
    }
    impl_->config = {ov::hint::inference_precision(bf16 ? ov::element::bf16 : ov::element::f32),
                     ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
    if (threads) impl_->config.emplace(ov::inference_num_threads(*threads));
  });
}

OpenVinoNetwork::~OpenVinoNetwork() = default;
std::vector<TensorPort> OpenVinoNetwork::inputs() const { return openvino([&] { return ports(impl_->model->inputs()); }); }
std::vector<TensorPort> OpenVinoNetwork::outputs() const { return openvino([&] { return ports(impl_->model->outputs()); }); }
const std::string& OpenVinoNetwork::description() const { return impl_->description; }

ov::InferRequest& OpenVinoNetwork::Impl::request(int64_t nb) {
  auto it = requests.find(nb);
  if (it == requests.end()) {
    const std::shared_ptr<ov::Model> reshaped = model->clone();
    std::map<std::string, ov::PartialShape> shapes;
    for (const auto& in : reshaped->inputs()) {
      ov::PartialShape shape = in.get_partial_shape();
      shape[0] = nb;
      shapes[in.get_any_name()] = shape;
    }
    reshaped->reshape(shapes);
    it = requests.emplace(nb, core.compile_model(reshaped, "CPU", config).create_infer_request()).first;
  }
  return it->second;
}

void OpenVinoNetwork::prepare(int64_t nb) { openvino([&] { impl_->request(nb); }); }

void OpenVinoNetwork::run(float* x, int64_t* t, int64_t* y, const int64_t x_shape[4], float* out,
                          const int64_t out_shape[4]) {
  openvino([&] {
    ov::InferRequest& request = impl_->request(x_shape[0]);
    const auto shape = [](const int64_t* dims, size_t rank) { return ov::Shape(dims, dims + rank); };
    request.set_tensor("x", ov::Tensor(ov::element::f32, shape(x_shape, 4), x));
    request.set_tensor("t", ov::Tensor(ov::element::i64, shape(x_shape, 1), t));
    if (y) request.set_tensor("y", ov::Tensor(ov::element::i64, shape(x_shape, 1), y));
    request.set_output_tensor(0, ov::Tensor(ov::element::f32, shape(out_shape, 4), out));
    request.infer();
  });
}

#else  // built without OpenVINO

struct OpenVinoNetwork::Impl {};

OpenVinoNetwork::OpenVinoNetwork(const std::string&, Precision, std::optional<int>) {
  throw Error("engine openvino: this library was built without OpenVINO (configure cpp_runner with "
              "-DDDPM_WITH_OPENVINO=ON, or run cpp_runner/build.sh with the openvino wheel installed)");
}
OpenVinoNetwork::~OpenVinoNetwork() = default;
std::vector<TensorPort> OpenVinoNetwork::inputs() const { return {}; }
std::vector<TensorPort> OpenVinoNetwork::outputs() const { return {}; }
const std::string& OpenVinoNetwork::description() const {
  static const std::string none;
  return none;
}
void OpenVinoNetwork::prepare(int64_t) {}
void OpenVinoNetwork::run(float*, int64_t*, int64_t*, const int64_t*, float*, const int64_t*) {}

#endif

}  // namespace ddpm
