#include "ddpm_sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <numeric>
#include <sstream>

#include "mt19937.h"

namespace ddpm {
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);) parts.push_back(item);
  return parts;
}

double parse_double(const std::string& s, const std::string& what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || !std::isfinite(v)) throw UsageError(what + ": not a number: '" + s + "'");
  return v;
}

int64_t parse_int(const std::string& s, const std::string& what) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0') throw UsageError(what + ": not an integer: '" + s + "'");
  return v;
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

bool one_of(const std::string& v, std::initializer_list<const char*> allowed) {
  return std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return v == a; });
}

ModelInfo read_metadata(const Ort::Session& session, const std::string& path) {
  Ort::AllocatorWithDefaultOptions alloc;
  const Ort::ModelMetadata md = session.GetModelMetadata();
  auto get = [&](const std::string& key) -> std::string {
    const auto v = md.LookupCustomMetadataMapAllocated(("ddpm." + key).c_str(), alloc);
    if (!v) throw UsageError(path + " is not a DDPM model: metadata key 'ddpm." + key + "' is missing (export it with `ddpm export`)");
    return v.get();
  };
  if (get("format") != "1") throw UsageError(path + ": unsupported ddpm.format '" + get("format") + "' (this runner reads 1)");
  ModelInfo info;
  for (const auto& b : split(get("betas"), ',')) info.betas.push_back(parse_double(b, "ddpm.betas"));
  const int64_t T = parse_int(get("num_timesteps"), "ddpm.num_timesteps");
  if (T < 1 || T != static_cast<int64_t>(info.betas.size()))
    throw UsageError(path + ": ddpm.num_timesteps is " + std::to_string(T) + " but ddpm.betas has " + std::to_string(info.betas.size()) + " values");
  for (double b : info.betas)
    if (!(b > 0.0 && b < 1.0)) throw UsageError(path + ": ddpm.betas must lie in (0, 1)");
  info.parameterization = get("parameterization");
  info.variance = get("variance");
  if (!one_of(info.parameterization, {"eps", "x0", "v"})) throw UsageError(path + ": unknown ddpm.parameterization '" + info.parameterization + "'");
  if (!one_of(info.variance, {"fixed_small", "fixed_large", "learned_range"})) throw UsageError(path + ": unknown ddpm.variance '" + info.variance + "'");
  const auto shape = split(get("image_shape"), ',');
  if (shape.size() != 3) throw UsageError(path + ": ddpm.image_shape must be 'C,H,W'");
  info.C = parse_int(shape[0], "ddpm.image_shape"), info.H = parse_int(shape[1], "ddpm.image_shape"), info.W = parse_int(shape[2], "ddpm.image_shape");
  if (info.C < 1 || info.H < 1 || info.W < 1) throw UsageError(path + ": ddpm.image_shape must be positive");
  const std::string clip = get("clip_denoised");
  if (!one_of(clip, {"true", "false"})) throw UsageError(path + ": ddpm.clip_denoised must be true or false");
  info.clip_denoised = clip == "true";
  if (get("timestep_dtype") != "int64") throw UsageError(path + ": ddpm.timestep_dtype must be int64");
  return info;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One plan step on a batch of b images, in float32 with the float64 coefficients cast to float32:
// x0 = x0_x x + x0_o o, clipped; x = mean_x0 x0 + mean_xt x (posterior mean Eq. 7, or DDIM Eq. 12).
// Branch-free so that it vectorises: clipping to +-inf leaves x0 as it is.
void step_mean(const Plan& p, size_t k, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out) {
  const float ax = float(p.x0_x[k]), ao = float(p.x0_o[k]), m0 = float(p.mean_x0[k]), mt = float(p.mean_xt[k]);
  const float lo = p.clip ? -1.0f : -INFINITY, hi = p.clip ? 1.0f : INFINITY;
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float* oi = out + i * out_chw;
    for (int64_t j = 0; j < chw; ++j) {
      const float x0 = std::min(std::max(ax * xi[j] + ao * oi[j], lo), hi);
      xi[j] = m0 * x0 + mt * xi[j];
    }
  }
}

// x += s noise; s = sigma, or for learned_range exp(0.5 (frac log_var_max + (1 - frac) log_var_min)) with
// frac = (v + 1) / 2 and v the second C output channels (Nichol & Dhariwal Eq. 15).
void step_noise(const Plan& p, size_t k, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out,
                const float* noise) {
  const float sg = float(p.sigma[k]), lmin = float(p.log_var_min[k]), lmax = float(p.log_var_max[k]);
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float* vi = out + i * out_chw + chw;
    const float* ni = noise + i * chw;
    if (!p.learned) {
      for (int64_t j = 0; j < chw; ++j) xi[j] = xi[j] + sg * ni[j];
      continue;
    }
    for (int64_t j = 0; j < chw; ++j) {
      const float frac = (vi[j] + 1.0f) / 2.0f;
      xi[j] = xi[j] + std::exp(0.5f * (frac * lmax + (1.0f - frac) * lmin)) * ni[j];
    }
  }
}

bool init_ort_api() {
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api)
    throw UsageError("the ONNX Runtime library (" + std::string(OrtGetApiBase()->GetVersionString()) +
                     ") is older than its headers (API " + std::to_string(ORT_API_VERSION) + "); rebuild against matching headers");
  Ort::InitApi(api);
  return true;
}

}  // namespace

std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, const std::string& spacing) {
  if (!one_of(spacing, {"uniform", "linspace", "trailing", "quadratic"}))
    throw UsageError("unknown spacing '" + spacing + "' (uniform, linspace, trailing or quadratic)");
  if (S < 1 || S > T) throw UsageError("steps must be in 1.." + std::to_string(T) + ", got " + std::to_string(S));
  std::vector<int64_t> ts(S);
  if (S == T) {
    std::iota(ts.begin(), ts.end(), 0);
    return ts;
  }
  for (int64_t i = 0; i < S; ++i) {
    if (spacing == "uniform") {
      ts[i] = i * (T / S);
    } else if (spacing == "linspace") {
      ts[i] = S == 1 ? 0 : int64_t(std::floor(double(i * (T - 1)) / double(S - 1) + 0.5));
    } else if (spacing == "trailing") {
      ts[i] = int64_t(std::floor(double(T) - double(S - 1 - i) * (double(T) / double(S)) + 0.5)) - 1;
    } else {
      const double r = S == 1 ? 0.0 : double(i) * std::sqrt(0.8 * double(T)) / double(S - 1);
      ts[i] = int64_t(r * r);
    }
  }
  for (int64_t i = 0; i < S; ++i)
    if (ts[i] < 0 || ts[i] > T - 1 || (i > 0 && ts[i] <= ts[i - 1]))
      throw UsageError("spacing " + spacing + " cannot give " + std::to_string(S) + " distinct steps for T=" + std::to_string(T));
  return ts;
}

Plan make_plan(const ModelInfo& info, const PlanOptions& opt) {
  if (!one_of(opt.sampler, {"ancestral", "ddim"})) throw UsageError("unknown sampler '" + opt.sampler + "' (ancestral or ddim)");
  const bool ddim = opt.sampler == "ddim";
  if (!(opt.eta >= 0.0 && opt.eta <= 1.0)) throw UsageError("eta must be in [0, 1]");
  const int64_t T = info.betas.size();
  const int64_t S = opt.steps ? opt.steps : (ddim ? 50 : T);
  const std::vector<int64_t> ts = kept_timesteps(T, S, opt.spacing);
  std::vector<double> abar(T);
  for (int64_t i = 0; i < T; ++i) abar[i] = (i ? abar[i - 1] : 1.0) * (1.0 - info.betas[i]);

  Plan p;
  p.learned = info.variance == "learned_range" && !ddim;
  p.clip = opt.clip < 0 ? info.clip_denoised : opt.clip != 0;
  p.channels = info.C;
  auto post_var = [&](int64_t k) {  // Eq. (7) on the respaced process
    const double ab = abar[ts[k]], ab_prev = k ? abar[ts[k - 1]] : 1.0;
    return (1.0 - ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab);
  };
  for (int64_t k = S - 1; k >= 0; --k) {
    const double ab = abar[ts[k]], ab_prev = k ? abar[ts[k - 1]] : 1.0;
    const double beta = 1.0 - ab / ab_prev, alpha = 1.0 - beta;
    const std::string& par = info.parameterization;
    p.t.push_back(ts[k]);
    p.x0_x.push_back(par == "eps" ? std::sqrt(1.0 / ab) : par == "x0" ? 0.0 : std::sqrt(ab));
    p.x0_o.push_back(par == "eps" ? -std::sqrt(1.0 / ab - 1.0) : par == "x0" ? 1.0 : -std::sqrt(1.0 - ab));
    p.log_var_min.push_back(k >= 1 ? std::log(post_var(k)) : S > 1 ? std::log(post_var(1)) : std::log(beta));
    p.log_var_max.push_back(std::log(beta));
    p.add_noise.push_back(k > 0 && (!ddim || opt.eta > 0.0));
    if (ddim) {  // Song et al. Eq. (12), eps re-derived from the (clipped) x0
      const double sigma = opt.eta * std::sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev));
      const double d = std::sqrt(std::max(1.0 - ab_prev - sigma * sigma, 0.0));
      p.sigma.push_back(sigma);
      p.mean_x0.push_back(std::sqrt(ab_prev) - d * std::sqrt(ab) / std::sqrt(1.0 - ab));
      p.mean_xt.push_back(d / std::sqrt(1.0 - ab));
    } else {  // Algorithm 2, posterior mean Eq. (7)
      p.sigma.push_back(info.variance == "fixed_large" ? std::sqrt(beta) : std::sqrt(post_var(k)));
      p.mean_x0.push_back(beta * std::sqrt(ab_prev) / (1.0 - ab));
      p.mean_xt.push_back((1.0 - ab_prev) * std::sqrt(alpha) / (1.0 - ab));
    }
  }
  return p;
}

Sampler::Sampler(const std::string& model_path, const std::string& provider, int threads)
    : api_ready_(init_ort_api()), env_(ORT_LOGGING_LEVEL_FATAL, "ddpm_runner") {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(model_path, ec)) throw UsageError("model file not found: " + model_path);
  Ort::SessionOptions so;
  if (threads > 0) so.SetIntraOpNumThreads(threads);
  if (provider == "cuda") {
    const auto avail = Ort::GetAvailableProviders();
    if (std::find(avail.begin(), avail.end(), "CUDAExecutionProvider") == avail.end())
      throw UsageError("--provider cuda: this ONNX Runtime build has no CUDA execution provider");
    try {
      OrtCUDAProviderOptions cuda_options{};
      so.AppendExecutionProvider_CUDA(cuda_options);
    } catch (const Ort::Exception& e) {
      throw UsageError("--provider cuda: CUDA execution provider unavailable (it needs an NVIDIA GPU and the CUDA 12 / cuDNN 9 libraries on the library path): " + one_line(e.what()));
    }
    cuda_ = true;
    provider_name_ = "CUDAExecutionProvider";
  } else if (provider == "cpu") {
    provider_name_ = "CPUExecutionProvider";
  } else {
    throw UsageError("unknown provider '" + provider + "' (cpu or cuda)");
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
  if (inputs.size() != 2 || std::count(inputs.begin(), inputs.end(), "x") != 1 || std::count(inputs.begin(), inputs.end(), "t") != 1)
    throw UsageError(model_path + ": expected the inputs 'x' and 't' of an exported eps_theta");
  out_name_ = session_.GetOutputNameAllocated(0, alloc).get();
}

std::vector<float> Sampler::sample(const Plan& p, int64_t n, int64_t batch, uint32_t seed, RunStats* stats,
                                   const Progress& progress) {
  if (n < 1 || batch < 1) throw UsageError("n and batch must be at least 1");
  batch = std::min(batch, n);
  const int64_t C = info_.C, Co = info_.out_channels(), chw = C * info_.H * info_.W, out_chw = Co * info_.H * info_.W;
  // x lives in the result itself; network output, noise and t are allocated once and reused.
  std::vector<float> result(n * chw), out(batch * out_chw), noise(batch * chw);
  std::vector<int64_t> t(batch);
  RandomState rng(seed);
  const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::IoBinding binding(session_);
  const Ort::RunOptions run_options;
  const int64_t n_batches = (n + batch - 1) / batch, S = p.size();
  double network_s = 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t bi = 0; bi < n_batches; ++bi) {
    const int64_t b = std::min(batch, n - bi * batch);
    float* x = result.data() + bi * batch * chw;
    const int64_t x_shape[4] = {b, C, info_.H, info_.W}, out_shape[4] = {b, Co, info_.H, info_.W};
    const Ort::Value xv = Ort::Value::CreateTensor<float>(mem, x, b * chw, x_shape, 4);
    const Ort::Value tv = Ort::Value::CreateTensor<int64_t>(mem, t.data(), b, &b, 1);
    const Ort::Value ov = Ort::Value::CreateTensor<float>(mem, out.data(), b * out_chw, out_shape, 4);
    binding.BindOutput(out_name_.c_str(), ov);
    rng.fill_normal(x, b * chw);  // x_T
    for (int64_t k = 0; k < S; ++k) {
      std::fill(t.begin(), t.begin() + b, p.t[k]);
      // This step's noise is drawn on a second thread while the network runs (large batches only, where
      // drawing costs more than starting a thread); the stream and its order stay those of the contract.
      std::future<void> drawn;
      if (p.add_noise[k])
        drawn = std::async(b * chw >= (1 << 16) ? std::launch::async : std::launch::deferred,
                           [&rng, &noise, n_noise = b * chw] { rng.fill_normal(noise.data(), n_noise); });
      const auto r0 = std::chrono::steady_clock::now();
      // Binding copies a host input to the device (CUDA) at bind time, so bind again after every update.
      binding.BindInput("x", xv);
      binding.BindInput("t", tv);
      if (cuda_) binding.SynchronizeInputs();
      session_.Run(run_options, binding);
      if (cuda_) binding.SynchronizeOutputs();
      network_s += seconds_since(r0);
      step_mean(p, k, b, chw, out_chw, x, out.data());
      if (drawn.valid()) {
        drawn.get();
        step_noise(p, k, b, chw, out_chw, x, out.data(), noise.data());
      }
      if (progress) progress(bi, n_batches, k + 1, S);
    }
  }
  if (stats) *stats = RunStats{seconds_since(t0), network_s};
  return result;
}

}  // namespace ddpm
