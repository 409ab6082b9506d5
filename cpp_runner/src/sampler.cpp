// The Sampler: a file's sessions (ONNX Runtime, or OpenVINO for the network), and a plan run on batches of images,
// with the update on the host or, on the step-graph path, as ONNX graphs on the network's provider.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <thread>
#include <tuple>

#include "internal.h"
#include "mt19937.h"

namespace ddpm {

using namespace internal;

Error::~Error() = default;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The step's noise, drawn on a second thread while the network runs when a core is free for it and drawing
// costs more than starting a thread; the stream and its order stay those of the contract.
std::future<void> draw_noise(RandomState& rng, float* z, int64_t count, bool spare_core) {
  const auto policy = spare_core && count >= (1 << 14) ? std::launch::async : std::launch::deferred;
  return std::async(policy, [&rng, z, count] { rng.fill_normal(z, count); });
}

// True when no value is NaN or inf: an all-ones exponent. On the bits, so that it vectorises.
bool all_finite(const float* v, size_t n) {
  uint32_t nonfinite = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, sizeof bits);
    nonfinite |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
  }
  return nonfinite == 0;
}

void need_finite_output(bool ok, const std::string& where) {
  need(ok, "the network's output holds NaN or inf (" + where + "): the model file is broken, or was exported from a "
           "diverged checkpoint");
}

// The API table of the ONNX Runtime library in use, fetched once per process: a runtime older than the headers
// offers no table of their version, which is a clear error rather than a crash in a missing function.
void init_ort_api() {
  static const OrtApi* const api = [] {
    const OrtApi* a = OrtGetApiBase()->GetApi(ORT_API_VERSION);
    if (a) Ort::InitApi(a);
    return a;
  }();
  need(api != nullptr, "the ONNX Runtime library in use is version " + std::string(OrtGetApiBase()->GetVersionString()) +
                           "; this library needs 1." + std::to_string(ORT_API_VERSION) + " or newer (C API version " +
                           std::to_string(ORT_API_VERSION) + ", the headers it was built with)");
}

// Runs f; ONNX Runtime's exceptions and a failed allocation become Error, the one type the library throws.
template <typename F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return allocating(f);
  } catch (const Ort::Exception& e) {
    throw Error("onnxruntime: " + one_line(e.what()));
  }
}

}  // namespace

// ---- the sampler ------------------------------------------------------------------------------------------
struct Sampler::Impl {
  Impl(const std::string& model_path, const LoadOptions& options);

  using Tick = std::function<void(int64_t step)>;
  struct Labels {  // the network's labels for one batch: [B], or [2B] (the labels, then the null label) if guided
    std::vector<int64_t> y;
    bool guided = false;
    float scale = 1.0f;
  };
  Labels batch_labels(const Conditioning& cond, int64_t first, int64_t b) const;
  bool open_session(const std::string& path, std::optional<int> threads, bool cuda, bool required);
  Ort::Session& step_session(bool learned, int64_t memory, bool guided);
  RunStats sample(const Plan& plan, uint32_t seed, float* out, size_t n_floats, const SampleOptions& options);
  struct Batch {
    int64_t b, nb, chw, out_chw;
    std::array<int64_t, 4> x_shape, net_shape, out_shape;
    std::vector<int64_t> t;
  };
  struct DeviceBatch;
  struct HostCall;
  Batch start_batch(int64_t b, float* x, bool draw_x_T, RandomState& rng, const Labels& labels) const;
  double run_network_on_host(Batch& B, const Step& s, float* x, std::vector<float>& pair, Labels& labels,
                             std::vector<float>& out, HostCall& call);
  // Both run the plan on x (the batch's slice of the result), which holds the start (init) or is drawn as x_T.
  double run_batch_on_host(const Plan& p, int64_t b, float* x, bool draw_x_T, RandomState& rng, const Tick& tick,
                           Labels& labels);
  double run_batch_on_provider(const Plan& p, int64_t b, float* x, bool draw_x_T, RandomState& rng,
                               const Tick& tick, Labels& labels);

  bool api_ready_ = (init_ort_api(), true);  // before anything below is built
  Ort::Env env_;
  Ort::SessionOptions options_;
  Ort::Session session_{nullptr};
  // The row updates of the step-graph path by (learned, memory, guided), built when first needed and kept, so that
  // a session (and, on CUDA, its kernels and memory) is made once per Sampler, not once per sample call.
  std::map<std::tuple<bool, int64_t, bool>, Ort::Session> step_sessions_;
  std::unique_ptr<OpenVinoNetwork> openvino_;  // the network under Engine::OpenVino (session_ stays empty)
  ModelInfo info_;
  std::string provider_name_;
  std::unique_ptr<Ort::Allocator> cuda_allocator_;
  OrtAllocator* device_allocator_ = nullptr;  // where x lives on the step-graph path
  bool cuda_ = false, step_graph_ = false, spare_core_ = false;
};

Sampler::Impl::Impl(const std::string& model_path, const LoadOptions& opt) : env_(ORT_LOGGING_LEVEL_FATAL, "ddpm") {
  std::error_code ec;
  need(std::filesystem::is_regular_file(model_path, ec), "model file not found: " + model_path);
  to_string(opt.provider);  // an Error for a value outside the enum
  need(!opt.threads || (*opt.threads >= 1 && *opt.threads <= 1024), "threads must be in 1..1024 (or none: ONNX Runtime's default)");
  to_string(opt.engine), to_string(opt.precision);
  const auto props = read_metadata_props(model_path);
  info_ = read_metadata(props, model_path);
  const auto own = props.count("ddpm.precision") ? props.at("ddpm.precision") : std::string("fp32");
  if (opt.engine == Engine::OpenVino) {
    need(opt.provider != Provider::Cuda && !opt.step_graph, "engine openvino runs the network on the CPU, with the "
         "update on the host: not with provider cuda or step_graph");
    openvino_ = std::make_unique<OpenVinoNetwork>(model_path, opt.precision, opt.threads);
    provider_name_ = openvino_->description();
    const std::string device = "OpenVINO CPU ";  // the quantized operations in int8, the others at its precision
    if (own == "int8")
      provider_name_ = device + "int8 (the file's ddpm.precision), its other operations " +
                       provider_name_.substr(device.size());
  } else {
    need(opt.precision == Precision::Auto || to_string(opt.precision) == own,
         "precision " + to_string(opt.precision) + ": ONNX Runtime computes in the file's own precision (" +
         printable(own) + "); export the model at another precision, or use engine openvino for bf16");
    if (opt.provider == Provider::Cpu || !open_session(model_path, opt.threads, true, opt.provider == Provider::Cuda))
      open_session(model_path, opt.threads, false, true);
  }
  step_graph_ = opt.step_graph || cuda_;
  // ONNX Runtime's CPU default is a thread per core, so only a GPU run or a capped thread count leaves one.
  spare_core_ = cuda_ || (opt.threads && unsigned(*opt.threads) < std::thread::hardware_concurrency());
  check_graph(openvino_ ? openvino_ports(*openvino_) : session_ports(session_), info_, model_path);
  Ort::AllocatorWithDefaultOptions alloc;
  device_allocator_ = alloc;
  if (cuda_) {
    cuda_allocator_ = std::make_unique<Ort::Allocator>(session_, Ort::MemoryInfo("Cuda", OrtArenaAllocator, 0, OrtMemTypeDefault));
    device_allocator_ = *cuda_allocator_;
  }
}

// The network's session on CUDA or the CPU. Where CUDA is not `required` (Provider::Auto), a CUDA that cannot be
// used (no such provider in this build, a library or the GPU missing) returns false, quietly, instead of an Error.
bool Sampler::Impl::open_session(const std::string& path, std::optional<int> threads, bool cuda, bool required) {
  options_ = Ort::SessionOptions();
  if (threads) options_.SetIntraOpNumThreads(*threads);
  const std::string name = cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  const auto no_cuda = [&](const std::string& why) {
    need(!required, "provider cuda: " + why);
    return false;
  };
  if (cuda) {
    const auto available = Ort::GetAvailableProviders();
    if (std::count(available.begin(), available.end(), name) == 0) return no_cuda("this ONNX Runtime build has no CUDA execution provider");
    // Warnings on stderr, among them the list of nodes that fell back to the CPU (a silent slowdown otherwise).
    if (required) options_.SetLogSeverityLevel(ORT_LOGGING_LEVEL_WARNING);
    try {
      options_.AppendExecutionProvider_CUDA(OrtCUDAProviderOptions{});
    } catch (const Ort::Exception& e) {
      return no_cuda("CUDA execution provider unavailable (it needs an NVIDIA GPU and the CUDA and cuDNN libraries "
                     "of this ONNX Runtime build on the library path): " + one_line(e.what()));
    }
  }
  try {
    session_ = Ort::Session(env_, path.c_str(), options_);
  } catch (const Ort::Exception& e) {
    if (cuda && !required) return false;  // the CPU's attempt says what is wrong with the file, if anything
    throw Error("cannot load " + path + " with " + name + ": " + one_line(e.what()));
  }
  cuda_ = cuda, provider_name_ = name;
  return true;
}

Ort::Session& Sampler::Impl::step_session(bool learned, int64_t memory, bool guided) {
  const auto key = std::make_tuple(learned, memory, guided);
  auto it = step_sessions_.find(key);
  if (it == step_sessions_.end()) {
    const std::string graph = step_graph(learned, info_.out_channels() != info_.C, memory, guided);
    it = step_sessions_.emplace(key, Ort::Session(env_, graph.data(), graph.size(), options_)).first;
  }
  return it->second;
}

Sampler::Impl::Labels Sampler::Impl::batch_labels(const Conditioning& cond, int64_t first, int64_t b) const {
  Labels l;
  if (!info_.num_classes) {  // no y input: zeros of the batch size keep the tensor that is never bound valid
    l.y.assign(b, 0);
    return l;
  }
  const int64_t null = info_.num_classes;
  const double guidance = cond.guidance.value_or(cond.labels.empty() ? 1.0 : kDefaultGuidance);
  l.guided = !cond.labels.empty() && guidance != 0.0 && guidance != 1.0;
  l.scale = float(guidance);
  for (int64_t i = 0; i < b; ++i)
    l.y.push_back(cond.labels.empty() || guidance == 0.0 ? null : cond.labels[first + i]);
  if (l.guided) l.y.resize(2 * b, null);
  return l;
}

RunStats Sampler::Impl::sample(const Plan& p, uint32_t seed, float* out, size_t n_floats, const SampleOptions& o) {
  const size_t chw = info_.image_floats();
  need(out != nullptr && n_floats >= chw && n_floats % chw == 0,
       "the output buffer must hold n >= 1 images of C*H*W = " + std::to_string(chw) + " floats, got " +
       std::to_string(n_floats) + " floats");
  // The largest buffer is [2 batch, 2 C, H, W] (guided, learned variances): keep its size far from overflowing.
  need(n_floats <= size_t(PTRDIFF_MAX) / (8 * sizeof(float)), "the output buffer is too large");
  const int64_t n = int64_t(n_floats / chw);
  const Conditioning& cond = o.conditioning;
  need(!o.batch || *o.batch >= 1, "batch must be at least 1 (or none: all at once)");
  need(p.channels == info_.C && p.memory >= 0 &&
       std::all_of(p.steps.begin(), p.steps.end(), [&](const Step& s) {
         return s.t >= 0 && s.t < int64_t(info_.betas.size()) && int64_t(s.mean_x0_prev.size()) == p.memory &&
                (!s.learned || info_.variance == "learned_range");
       }), "the plan was not made for this model (use make_plan with this Sampler's info())");
  need(info_.num_classes || cond.labels.empty(), "this model is unconditional: it takes no labels (--class)");
  need(!cond.labels.empty() || cond.guidance.value_or(1.0) == 1.0, "a guidance scale needs labels (--class or --classes)");
  need(std::isfinite(cond.guidance.value_or(1.0)), "the guidance scale must be a finite number");
  need(cond.labels.empty() || int64_t(cond.labels.size()) == n, "one label per image is needed");
  for (int64_t y : cond.labels)
    need(y >= 0 && y < info_.num_classes, "label " + std::to_string(y) + " is out of range: the model has classes 0.." +
         std::to_string(info_.num_classes - 1));
  need(!o.init || all_finite(o.init, n_floats), "the starting images (init) hold NaN or inf");
  const int64_t batch = std::min<int64_t>(o.batch.value_or(n), n);
  if (o.init && o.init != out) std::memmove(out, o.init, n_floats * sizeof(float));
  RandomState rng(seed);
  const int64_t n_batches = (n + batch - 1) / batch;
  if (openvino_)  // OpenVINO compiles for each static batch: before the clock, as ONNX Runtime's session is built
    for (int64_t nb : {batch, n % batch})
      if (nb) openvino_->prepare(int64_t(batch_labels(cond, 0, nb).y.size()));
  double network_s = 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t bi = 0; bi < n_batches; ++bi) {
    const int64_t b = std::min(batch, n - bi * batch);
    float* x = out + bi * batch * int64_t(chw);
    const auto tick = [&](int64_t k) {
      if (o.progress) o.progress(bi, n_batches, k, p.steps.size());
    };
    Labels labels = batch_labels(cond, bi * batch, b);
    network_s += step_graph_ ? run_batch_on_provider(p, b, x, !o.init, rng, tick, labels)
                             : run_batch_on_host(p, b, x, !o.init, rng, tick, labels);
    // Finite outputs can still overflow x; the result an app gets is finite or an error.
    need_finite_output(all_finite(x, size_t(b) * chw), "the samples overflowed");
  }
  return RunStats{seconds_since(t0), network_s};
}

// What both batch paths share: the shapes of x [b, C, H, W] and of the network's input and output [nb, ...] (nb =
// 2b when guided, the network's input then [x; x]), the timesteps' storage, and x_T drawn into x unless x holds the
// start (init).
Sampler::Impl::Batch Sampler::Impl::start_batch(int64_t b, float* x, bool draw_x_T, RandomState& rng,
                                                const Labels& labels) const {
  Batch batch;
  batch.b = b, batch.nb = labels.guided ? 2 * b : b;
  batch.chw = info_.C * info_.H * info_.W, batch.out_chw = info_.out_channels() * info_.H * info_.W;
  batch.x_shape = {b, info_.C, info_.H, info_.W};
  batch.net_shape = {batch.nb, info_.C, info_.H, info_.W};
  batch.out_shape = {batch.nb, info_.out_channels(), info_.H, info_.W};
  batch.t.resize(batch.nb);
  if (draw_x_T) rng.fill_normal(x, b * batch.chw);
  return batch;
}

// The network's tensors on the host path, made once per batch: views of its input (x, or [x; x] in `pair` when
// guided), the timesteps, the labels and the output buffer.
struct Sampler::Impl::HostCall {
  HostCall(Batch& B, float* net_x, Labels& labels, std::vector<float>& out) {
    const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    inputs.push_back(Ort::Value::CreateTensor<float>(mem, net_x, B.nb * B.chw, B.net_shape.data(), 4));
    inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, B.t.data(), B.nb, &B.nb, 1));
    inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, labels.y.data(), labels.y.size(), &B.nb, 1));
    output = Ort::Value::CreateTensor<float>(mem, out.data(), out.size(), B.out_shape.data(), 4);
  }
  std::vector<Ort::Value> inputs;
  Ort::Value output{nullptr};
};

// One network call of row s on the host: x (copied into [x; x] when guided) in, the output into out.
double Sampler::Impl::run_network_on_host(Batch& B, const Step& s, float* x, std::vector<float>& pair, Labels& labels,
                                          std::vector<float>& out, HostCall& call) {
  std::fill(B.t.begin(), B.t.end(), s.t);
  if (labels.guided) {  // [x; x]
    std::copy(x, x + B.b * B.chw, pair.begin());
    std::copy(x, x + B.b * B.chw, pair.begin() + B.b * B.chw);
  }
  const auto r0 = std::chrono::steady_clock::now();
  if (openvino_) {
    openvino_->run(labels.guided ? pair.data() : x, B.t.data(), info_.num_classes ? labels.y.data() : nullptr,
                   B.net_shape.data(), out.data(), B.out_shape.data());
  } else {
    const char* input_names[3] = {"x", "t", "y"};
    const char* output_name = "model_output";
    session_.Run(Ort::RunOptions{nullptr}, input_names, call.inputs.data(), info_.num_classes ? 3 : 2, &output_name,
                 &call.output, 1);
  }
  return seconds_since(r0);
}

// x stays in the result on the host; the network writes into a host buffer and the update is one fused loop.
// The last M x0 predictions are a ring of M + 1 buffers (zeros before the first row).
double Sampler::Impl::run_batch_on_host(const Plan& p, int64_t b, float* x, bool draw_x_T, RandomState& rng,
                                        const Tick& tick, Labels& labels) {
  Batch B = start_batch(b, x, draw_x_T, rng, labels);
  std::vector<float> out(B.nb * B.out_chw), z(b * B.chw), pair(labels.guided ? B.nb * B.chw : 0);
  std::vector<float> guided_out(labels.guided ? b * B.out_chw : 0);
  HostCall call(B, labels.guided ? pair.data() : x, labels, out);
  std::vector<std::vector<float>> x0s(p.memory ? p.memory + 1 : 0, std::vector<float>(b * B.chw, 0.0f));
  const int64_t ring = p.memory + 1;
  std::vector<const float*> earlier(p.memory);
  double network_s = 0.0;
  for (size_t k = 0; k < p.steps.size(); ++k) {
    const Step& s = p.steps[k];
    std::future<void> drawn = s.add_noise ? draw_noise(rng, z.data(), b * B.chw, spare_core_) : std::future<void>();
    network_s += run_network_on_host(B, s, x, pair, labels, out, call);
    need_finite_output(all_finite(out.data(), out.size()), "row " + std::to_string(k) + ", t = " + std::to_string(s.t));
    const float* o = labels.guided ? guide(out.data(), b, B.chw, B.out_chw, labels.scale, guided_out.data()) : out.data();
    for (int64_t j = 1; j <= p.memory; ++j) earlier[j - 1] = x0s[(int64_t(k) - j + ring * j) % ring].data();
    step_mean(p, s, b, B.chw, B.out_chw, x, o, p.memory ? x0s[k % ring].data() : nullptr, earlier);
    if (drawn.valid()) {
      drawn.get();
      step_noise(s, b, B.chw, B.out_chw, x, o, z.data());
    }
    tick(k + 1);
  }
  return network_s;
}

// The tensors and bindings of the step-graph path for one batch: host tensors that view the host buffers (t, z,
// zeros, c, the start, the labels, the guidance scale, the finiteness flags), device tensors for x, [x; x], the
// network's output and the ring of earlier x0s, and an IO binding for the network and for each kind of row update.
struct Sampler::Impl::DeviceBatch {
  DeviceBatch(Impl& sampler, const Plan& p, Batch& B, float* x_out, Labels& labels);
  Ort::Value device(const std::array<int64_t, 4>& shape) {
    return Ort::Value::CreateTensor<float>(allocator, shape.data(), 4);
  }
  Ort::Value host(float* data, int64_t count, const int64_t* shape, size_t rank) {
    return Ort::Value::CreateTensor<float>(mem, data, count, shape, rank);
  }
  OrtAllocator* allocator;
  Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  int64_t n_c, one = 1;
  std::array<int64_t, 4> scalar_shape = {1, 1, 1, 1};
  std::vector<float> start, z, zeros, c;
  float scale, bad_start = 0.0f, bad_end = 0.0f;
  Ort::Value start_v, pair_start_v, z_v, zeros_v, c_v, t_v, y_v, scale_v, bad_start_v, bad_end_v, result_v, out;
  std::vector<Ort::Value> x, bad, pair, x0s;  // x, bad and pair alternate between two tensors; x0s is a ring
  Ort::IoBinding net;
  Ort::Session* step_sessions[2] = {nullptr, nullptr};
  std::unique_ptr<Ort::IoBinding> updates[2];
};

Sampler::Impl::DeviceBatch::DeviceBatch(Impl& sampler, const Plan& p, Batch& B, float* x_out, Labels& labels)
    : allocator(sampler.device_allocator_), n_c(kCoefficients + p.memory), start(B.nb * B.chw), z(B.b * B.chw),
      zeros(B.b * B.chw, 0.0f), c(n_c), scale(labels.scale), net(sampler.session_) {
  std::copy(x_out, x_out + B.b * B.chw, start.begin());
  if (labels.guided) std::copy(x_out, x_out + B.b * B.chw, start.begin() + B.b * B.chw);  // [x_T; x_T]
  start_v = host(start.data(), B.b * B.chw, B.x_shape.data(), 4), pair_start_v = host(start.data(), B.nb * B.chw,
                                                                                      B.net_shape.data(), 4);
  z_v = host(z.data(), B.b * B.chw, B.x_shape.data(), 4), zeros_v = host(zeros.data(), B.b * B.chw, B.x_shape.data(), 4);
  c_v = host(c.data(), n_c, &n_c, 1), scale_v = host(&scale, 1, &one, 1);
  t_v = Ort::Value::CreateTensor<int64_t>(mem, B.t.data(), B.nb, &B.nb, 1);
  y_v = Ort::Value::CreateTensor<int64_t>(mem, labels.y.data(), labels.y.size(), &B.nb, 1);
  bad_start_v = host(&bad_start, 1, scalar_shape.data(), 4), bad_end_v = host(&bad_end, 1, scalar_shape.data(), 4);
  result_v = host(x_out, B.b * B.chw, B.x_shape.data(), 4), out = device(B.out_shape);
  for (int j = 0; j < 2; ++j) x.push_back(device(B.x_shape)), bad.push_back(device(scalar_shape));
  for (int j = 0; j < (labels.guided ? 2 : 0); ++j) pair.push_back(device(B.net_shape));
  for (int64_t j = 0; j < (p.memory ? p.memory + 1 : 0); ++j) x0s.push_back(device(B.x_shape));
  for (const Step& s : p.steps)
    if (!updates[s.learned]) {
      step_sessions[s.learned] = &sampler.step_session(s.learned, p.memory, labels.guided);
      updates[s.learned] = std::make_unique<Ort::IoBinding>(*step_sessions[s.learned]);
      updates[s.learned]->BindInput("out", out);
      if (labels.guided) updates[s.learned]->BindInput("scale", scale_v);
    }
  net.BindOutput("model_output", out);
  if (sampler.info_.num_classes) net.BindInput("y", y_v);
}

// x, the network output, the earlier x0s and the update stay on the provider's device (IO binding; the update
// is the ONNX graph of step_graph): per row only t, the coefficients and z (when drawn) go to the device, and x
// comes back once, after the last row, with the finiteness sum. On the CPU the same path runs with host memory
// (tested with --step-graph).
double Sampler::Impl::run_batch_on_provider(const Plan& p, int64_t b, float* x_out, bool draw_x_T,
                                            RandomState& rng, const Tick& tick, Labels& labels) {
  Batch B = start_batch(b, x_out, draw_x_T, rng, labels);
  DeviceBatch d(*this, p, B, x_out, labels);
  const Ort::Value *x = &d.start_v, *pair = &d.pair_start_v, *bad = &d.bad_start_v;
  const Ort::Value* z_bound[2] = {nullptr, nullptr};  // zeros are bound once; z after every draw
  double network_s = 0.0;
  const size_t S = p.steps.size(), ring = size_t(p.memory) + 1;
  for (size_t k = 0; k < S; ++k) {
    const Step& s = p.steps[k];
    std::fill(B.t.begin(), B.t.end(), s.t);
    std::future<void> drawn = s.add_noise ? draw_noise(rng, d.z.data(), b * B.chw, spare_core_) : std::future<void>();
    const auto r0 = std::chrono::steady_clock::now();
    d.net.BindInput("x", labels.guided ? *pair : *x);  // binding copies host tensors to the device: bind after every change
    d.net.BindInput("t", d.t_v);
    d.net.SynchronizeInputs();
    session_.Run(Ort::RunOptions{nullptr}, d.net);
    network_s += seconds_since(r0);
    row_coefficients(p, s, d.c.data());  // c_v views c: written in place
    if (drawn.valid()) drawn.get();
    Ort::IoBinding& update = *d.updates[s.learned];
    if (s.add_noise || z_bound[s.learned] != &d.zeros_v) update.BindInput("z", s.add_noise ? d.z_v : d.zeros_v);
    z_bound[s.learned] = s.add_noise ? &d.z_v : &d.zeros_v;
    for (size_t j = 1; j <= size_t(p.memory); ++j)
      update.BindInput(("x0_" + std::to_string(j)).c_str(), k >= j ? d.x0s[(k - j) % ring] : d.zeros_v);
    if (p.memory) update.BindOutput("x0", d.x0s[k % ring]);
    Ort::Value& next = k + 1 == S ? d.result_v : d.x[k % 2];
    Ort::Value& bad_next = k + 1 == S ? d.bad_end_v : d.bad[k % 2];
    update.BindInput("x", *x), update.BindInput("c", d.c_v), update.BindInput("bad", *bad);
    update.BindOutput("x_next", next), update.BindOutput("bad_next", bad_next);
    if (labels.guided) update.BindOutput("x_pair", d.pair[k % 2]);
    update.SynchronizeInputs();
    d.step_sessions[s.learned]->Run(Ort::RunOptions{nullptr}, update);
    x = &next, bad = &bad_next, pair = labels.guided ? &d.pair[k % 2] : pair;
    tick(k + 1);
  }
  for (auto& update : d.updates)
    if (update) update->SynchronizeOutputs();
  need_finite_output(S == 0 || d.bad_end == 0.0f, "at some row of this batch");
  return network_s;
}

// ---- the public API: every failure leaves as Error -----------------------------------------------------------
Sampler::Sampler(const std::string& model_path, const LoadOptions& options)
    : impl_(guarded([&] { return std::make_unique<Impl>(model_path, options); })) {}
Sampler::~Sampler() = default;
Sampler::Sampler(Sampler&&) noexcept = default;
Sampler& Sampler::operator=(Sampler&&) noexcept = default;
const ModelInfo& Sampler::info() const { return impl_->info_; }
const std::string& Sampler::provider() const { return impl_->provider_name_; }

RunStats Sampler::sample(const Plan& plan, uint32_t seed, float* out, size_t n_floats, const SampleOptions& options) {
  return guarded([&] { return impl_->sample(plan, seed, out, n_floats, options); });
}

}  // namespace ddpm
