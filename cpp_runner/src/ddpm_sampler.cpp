#include "ddpm_sampler.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <numeric>
#include <sstream>
#include <thread>

#include "mt19937.h"

namespace ddpm {
namespace {

void need(bool ok, const std::string& message) {
  if (!ok) throw UsageError(message);
}

bool one_of(const std::string& v, std::initializer_list<const char*> allowed) {
  return std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return v == a; });
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) parts.push_back(item);
  return parts;
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

ModelInfo read_metadata(const Ort::Session& session, const std::string& path) {
  Ort::AllocatorWithDefaultOptions alloc;
  const Ort::ModelMetadata md = session.GetModelMetadata();
  const auto get = [&](const std::string& key) -> std::string {
    const auto v = md.LookupCustomMetadataMapAllocated(("ddpm." + key).c_str(), alloc);
    need(bool(v), path + " is not a DDPM model: metadata key 'ddpm." + key + "' is missing (make it with ddpm export)");
    return v.get();
  };
  const std::string in = path + ": ";
  need(get("format") == "1", in + "ddpm.format is not 1; this runner reads format 1");
  ModelInfo m;
  for (const auto& b : split(get("betas"))) m.betas.push_back(parse_double(b, "ddpm.betas"));
  need(parse_int(get("num_timesteps"), "ddpm.num_timesteps") == int64_t(m.betas.size()),
       in + "ddpm.num_timesteps differs from the number of ddpm.betas");
  need(!m.betas.empty() && std::all_of(m.betas.begin(), m.betas.end(), [](double b) { return b > 0 && b <= 1; }),
       in + "ddpm.betas must lie in (0, 1]");
  m.parameterization = get("parameterization"), m.variance = get("variance");
  need(one_of(m.parameterization, {"eps", "x0", "v"}), in + "unknown ddpm.parameterization " + m.parameterization);
  double abar_T = 1.0;
  for (double b : m.betas) abar_T *= 1.0 - b;
  need(abar_T > 0 || m.parameterization != "eps", in + "zero terminal SNR (alpha_bar_T = 0) needs the v or x0 parameterization");
  need(one_of(m.variance, {"fixed_small", "fixed_large", "learned_range"}), in + "unknown ddpm.variance " + m.variance);
  const auto shape = split(get("image_shape"));
  need(shape.size() == 3, in + "ddpm.image_shape must be C,H,W");
  m.C = parse_int(shape[0], "ddpm.image_shape"), m.H = parse_int(shape[1], "ddpm.image_shape");
  m.W = parse_int(shape[2], "ddpm.image_shape");
  need(m.C > 0 && m.H > 0 && m.W > 0, in + "ddpm.image_shape must be positive");
  const std::string clip = get("clip_denoised");
  need(one_of(clip, {"true", "false"}), in + "ddpm.clip_denoised must be true or false");
  m.clip_denoised = clip == "true";
  need(get("timestep_dtype") == "int64", in + "ddpm.timestep_dtype must be int64");
  return m;
}

struct Pair {
  double a, b;
};

// x0 = a x_t + b out: Eq. (4) solved for x0 under each parameterisation (v = sqrt(ab) eps - sqrt(1-ab) x0).
Pair x0_coefficients(double ab, const std::string& par) {
  if (par == "eps") return {std::sqrt(1.0 / ab), -std::sqrt(1.0 / ab - 1.0)};
  if (par == "v") return {std::sqrt(ab), -std::sqrt(1.0 - ab)};
  return {0.0, 1.0};
}

// beta-tilde of the respaced process, Eq. (7).
double posterior_variance(double ab, double ab_prev) { return (1.0 - ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab); }

// Coefficients of x0 and x_t in the posterior mean mu-tilde, Eq. (7).
Pair posterior_mean(double ab, double ab_prev) {
  const double beta = 1.0 - ab / ab_prev, alpha = 1.0 - beta;
  return {beta * std::sqrt(ab_prev) / (1.0 - ab), (1.0 - ab_prev) * std::sqrt(alpha) / (1.0 - ab)};
}

// sigma(eta) of DDIM, Song et al. Eq. (16).
double ddim_sigma(double ab, double ab_prev, double eta) {
  return eta * std::sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev));
}

// DDIM, Song et al. Eq. (12), with eps re-derived from the (clipped) x0: coefficients of x0 and x_t.
Pair ddim_mean(double ab, double ab_prev, double sigma) {
  const double d = std::sqrt(std::max(1.0 - ab_prev - sigma * sigma, 0.0));
  return {std::sqrt(ab_prev) - d * std::sqrt(ab) / std::sqrt(1.0 - ab), d / std::sqrt(1.0 - ab)};
}

// One step on b images in float32, the coefficients cast to float32:
// x0 = clip(x0_x x + x0_o out[:C]); x = mean_x0 x0 + mean_xt x. Branch-free so that it vectorises
// (clipping to +-inf leaves x0 as it is).
void step_mean(const Plan& p, const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out) {
  const float ax = float(s.x0_x), ao = float(s.x0_o), m0 = float(s.mean_x0), mt = float(s.mean_xt);
  const float lo = p.clip ? -1.0f : -INFINITY, hi = p.clip ? 1.0f : INFINITY;
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float* oi = out + i * out_chw;
    for (int64_t j = 0; j < chw; ++j) xi[j] = m0 * std::min(std::max(ax * xi[j] + ao * oi[j], lo), hi) + mt * xi[j];
  }
}

// x += s z, with s = sigma, or for learned_range s = exp(0.5 (frac log_var_max + (1 - frac) log_var_min)),
// frac = (v + 1) / 2 and v the second C output channels (Nichol & Dhariwal Eq. 15).
void step_noise(const Plan& p, const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out,
                const float* z) {
  const float sigma = float(s.sigma), lmin = float(s.log_var_min), lmax = float(s.log_var_max);
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float *vi = out + i * out_chw + chw, *zi = z + i * chw;
    if (!p.learned) {
      for (int64_t j = 0; j < chw; ++j) xi[j] = xi[j] + sigma * zi[j];
    } else {
      for (int64_t j = 0; j < chw; ++j) {
        const float frac = (vi[j] + 1.0f) / 2.0f;
        xi[j] = xi[j] + std::exp(0.5f * (frac * lmax + (1.0f - frac) * lmin)) * zi[j];
      }
    }
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool init_ort_api() {
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  need(api != nullptr, "the ONNX Runtime library " + std::string(OrtGetApiBase()->GetVersionString()) +
                           " is older than the headers it was built with (API " + std::to_string(ORT_API_VERSION) + ")");
  Ort::InitApi(api);
  return true;
}

}  // namespace

int64_t parse_int(const std::string& s, const std::string& what) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  need(!s.empty() && *end == '\0' && errno == 0, what + ": not an integer: '" + s + "'");
  return v;
}

double parse_double(const std::string& s, const std::string& what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  need(!s.empty() && *end == '\0' && std::isfinite(v), what + ": not a number: '" + s + "'");
  return v;
}

std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, const std::string& spacing) {
  need(one_of(spacing, {"uniform", "linspace", "trailing", "quadratic"}),
       "unknown spacing '" + spacing + "' (uniform, linspace, trailing or quadratic)");
  need(S >= 1 && S <= T, "steps must be in 1.." + std::to_string(T) + ", got " + std::to_string(S));
  std::vector<int64_t> ts(S);
  std::iota(ts.begin(), ts.end(), 0);
  if (S == T) return ts;
  for (int64_t i = 0; i < S; ++i) {
    if (spacing == "uniform") {
      ts[i] = i * (T / S);
    } else if (spacing == "linspace") {
      ts[i] = S == 1 ? 0 : int64_t(std::floor(double(i * (T - 1)) / double(S - 1) + 0.5));
    } else if (spacing == "trailing") {  // floor(T - j T/S + 0.5) - 1 with j = S-1-i: already ascending
      ts[i] = int64_t(std::floor(double(T) - double(S - 1 - i) * (double(T) / double(S)) + 0.5)) - 1;
    } else {
      const double r = S == 1 ? 0.0 : double(i) * std::sqrt(0.8 * double(T)) / double(S - 1);
      ts[i] = int64_t(r * r);
    }
  }
  for (int64_t i = 0; i < S; ++i)
    need(ts[i] >= 0 && ts[i] <= T - 1 && (i == 0 || ts[i] > ts[i - 1]),
         "spacing " + spacing + " cannot give " + std::to_string(S) + " distinct steps for T=" + std::to_string(T));
  return ts;
}

Plan make_plan(const ModelInfo& info, const PlanOptions& opt) {
  need(one_of(opt.sampler, {"ancestral", "ddim"}), "unknown sampler '" + opt.sampler + "' (ancestral or ddim)");
  need(opt.eta >= 0.0 && opt.eta <= 1.0, "eta must be in [0, 1]");
  const bool ddim = opt.sampler == "ddim";
  const int64_t T = info.betas.size(), S = opt.steps ? opt.steps : (ddim ? 50 : T);
  const std::vector<int64_t> ts = kept_timesteps(T, S, opt.spacing);
  std::vector<double> abar(T);
  for (int64_t i = 0; i < T; ++i) abar[i] = (i ? abar[i - 1] : 1.0) * (1.0 - info.betas[i]);
  const auto ab_prev = [&](int64_t k) { return k ? abar[ts[k - 1]] : 1.0; };

  Plan p;
  p.learned = info.variance == "learned_range" && !ddim;
  p.clip = opt.clip < 0 ? info.clip_denoised : opt.clip != 0;
  p.channels = info.C;
  for (int64_t k = S - 1; k >= 0; --k) {
    const double ab = abar[ts[k]], ap = ab_prev(k), beta = 1.0 - ab / ap;
    const Pair x0 = x0_coefficients(ab, info.parameterization);
    const double sigma = ddim ? ddim_sigma(ab, ap, opt.eta)
                              : std::sqrt(info.variance == "fixed_large" ? beta : posterior_variance(ab, ap));
    const Pair mean = ddim ? ddim_mean(ab, ap, sigma) : posterior_mean(ab, ap);
    // beta-tilde at k = 0 is 0: its log is clipped to the value at k = 1, as in the original implementation.
    const double log_var_min = k ? std::log(posterior_variance(ab, ap))
                               : S > 1 ? std::log(posterior_variance(abar[ts[1]], ab_prev(1))) : std::log(beta);
    p.steps.push_back({ts[k], x0.a, x0.b, mean.a, mean.b, sigma, log_var_min, std::log(beta),
                       k > 0 && (!ddim || opt.eta > 0.0)});
  }
  return p;
}

Sampler::Sampler(const std::string& model_path, const std::string& provider, int threads)
    : api_ready_(init_ort_api()), env_(ORT_LOGGING_LEVEL_FATAL, "ddpm_runner") {
  std::error_code ec;
  need(std::filesystem::is_regular_file(model_path, ec), "model file not found: " + model_path);
  need(provider == "cpu" || provider == "cuda", "unknown provider '" + provider + "' (cpu or cuda)");
  Ort::SessionOptions so;
  if (threads > 0) so.SetIntraOpNumThreads(threads);
  cuda_ = provider == "cuda";
  // ONNX Runtime's CPU default is a thread per core, so only a GPU run or a capped thread count leaves one.
  spare_core_ = cuda_ || (threads > 0 && unsigned(threads) < std::thread::hardware_concurrency());
  provider_name_ = cuda_ ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  if (cuda_) {
    const auto available = Ort::GetAvailableProviders();
    need(std::count(available.begin(), available.end(), provider_name_) == 1,
         "--provider cuda: this ONNX Runtime build has no CUDA execution provider");
    try {
      so.AppendExecutionProvider_CUDA(OrtCUDAProviderOptions{});
    } catch (const Ort::Exception& e) {
      throw UsageError("--provider cuda: CUDA execution provider unavailable (it needs an NVIDIA GPU and the CUDA 12 "
                       "and cuDNN 9 libraries on the library path): " + one_line(e.what()));
    }
  }
  try {
    session_ = Ort::Session(env_, model_path.c_str(), so);
  } catch (const Ort::Exception& e) {
    throw UsageError("cannot load " + model_path + " with " + provider_name_ + ": " + one_line(e.what()));
  }
  info_ = read_metadata(session_, model_path);
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> inputs;
  for (size_t i = 0; i < session_.GetInputCount(); ++i) inputs.push_back(session_.GetInputNameAllocated(i, alloc).get());
  std::sort(inputs.begin(), inputs.end());
  need(inputs == std::vector<std::string>{"t", "x"}, model_path + ": the inputs must be x and t (an exported eps_theta)");
  out_name_ = session_.GetOutputNameAllocated(0, alloc).get();
}

std::vector<float> Sampler::sample(const Plan& p, int64_t n, int64_t batch, uint32_t seed, RunStats* stats,
                                   const Progress& progress) {
  need(n >= 1 && batch >= 1, "n and batch must be at least 1");
  batch = std::min(batch, n);
  const int64_t C = info_.C, Co = info_.out_channels(), chw = C * info_.H * info_.W, out_chw = Co * info_.H * info_.W;
  // x lives in the result itself; the network output, the noise and t are allocated once and reused.
  std::vector<float> result(n * chw), out(batch * out_chw), z(batch * chw);
  std::vector<int64_t> t(batch);
  RandomState rng(seed);
  const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::IoBinding binding(session_);
  const Ort::RunOptions run_options;
  const int64_t n_batches = (n + batch - 1) / batch, S = p.steps.size();
  double network_s = 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t bi = 0; bi < n_batches; ++bi) {
    const int64_t b = std::min(batch, n - bi * batch);
    float* x = result.data() + bi * batch * chw;
    const int64_t x_shape[4] = {b, C, info_.H, info_.W}, out_shape[4] = {b, Co, info_.H, info_.W};
    const auto xv = Ort::Value::CreateTensor<float>(mem, x, b * chw, x_shape, 4);
    const auto tv = Ort::Value::CreateTensor<int64_t>(mem, t.data(), b, &b, 1);
    const auto ov = Ort::Value::CreateTensor<float>(mem, out.data(), b * out_chw, out_shape, 4);
    binding.BindOutput(out_name_.c_str(), ov);
    rng.fill_normal(x, b * chw);  // x_T
    for (int64_t k = 0; k < S; ++k) {
      const Step& s = p.steps[k];
      std::fill(t.begin(), t.begin() + b, s.t);
      // The step's noise is drawn on a second thread while the network runs when a core is free for it and
      // drawing costs more than starting a thread; the stream and its order stay those of the contract.
      std::future<void> drawn;
      if (s.add_noise)
        drawn = std::async(spare_core_ && b * chw >= (1 << 14) ? std::launch::async : std::launch::deferred,
                           [&rng, &z, count = b * chw] { rng.fill_normal(z.data(), count); });
      const auto r0 = std::chrono::steady_clock::now();
      // BindInput copies a host tensor to the device (CUDA) at bind time: bind again after each update.
      binding.BindInput("x", xv);
      binding.BindInput("t", tv);
      if (cuda_) binding.SynchronizeInputs();
      session_.Run(run_options, binding);
      if (cuda_) binding.SynchronizeOutputs();
      network_s += seconds_since(r0);
      step_mean(p, s, b, chw, out_chw, x, out.data());
      if (drawn.valid()) {
        drawn.get();
        step_noise(p, s, b, chw, out_chw, x, out.data(), z.data());
      }
      if (progress) progress(bi, n_batches, k + 1, S);
    }
  }
  if (stats) *stats = RunStats{seconds_since(t0), network_s};
  return result;
}

}  // namespace ddpm
