#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <memory>
#include <numeric>
#include <sstream>
#include <thread>
#include <tuple>
#include <type_traits>

#include "ddpm/sampler.h"
#include "mt19937.h"
#include "openvino_network.h"
#include "parse.h"

// The float32 step arithmetic must round as numpy's does (see -ffp-contract=off in CMakeLists.txt).
#if defined(__FAST_MATH__)
#error "ddpm_sampler.cpp must not be compiled with -ffast-math: the samples would no longer match numpy's"
#endif

namespace ddpm {

Error::~Error() = default;

namespace {

bool one_of(const std::string& v, std::initializer_list<const char*> allowed) {
  return std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return v == a; });
}

std::string one_line(const std::string& s) { return printable(s, 500); }

// The names of the enums' values, in their order.
constexpr std::array<const char*, 6> kSamplers = {"ancestral", "ddim", "dpmpp2m", "dpmpp2m-sde", "dpmpp3m", "unipc"};
constexpr std::array<const char*, 5> kSpacings = {"uniform", "linspace", "trailing", "quadratic", "logsnr"};
constexpr std::array<const char*, 3> kProviders = {"auto", "cpu", "cuda"};
constexpr std::array<const char*, 2> kEngines = {"onnxruntime", "openvino"};
constexpr std::array<const char*, 3> kPrecisions = {"auto", "fp32", "bf16"};

template <typename E, size_t N>
E parse_name(const std::string& name, const std::array<const char*, N>& names, const std::string& what) {
  std::string valid;
  for (size_t i = 0; i < N; ++i) {
    if (name == names[i]) return E(i);
    valid += std::string(i == 0 ? "" : i + 1 < N ? ", " : " or ") + names[i];
  }
  throw Error("unknown " + what + " '" + printable(name) + "' (" + valid + ")");
}

// The name of e, or an Error for a value outside the enum (a cast from a bad integer).
template <typename E, size_t N>
std::string name_of(E e, const std::array<const char*, N>& names, const std::string& what) {
  const auto i = static_cast<std::make_unsigned_t<std::underlying_type_t<E>>>(e);
  need(i < N, "unknown " + what + " (enum value " + std::to_string(i) + ")");
  return names[i];
}

// Bounds on what a file may ask for, checked before anything is allocated from it: T up to 10^5 timesteps, images
// of up to 2^24 floats (e.g. 4 x 2048 x 2048), up to 2^20 classes.
constexpr int64_t kMaxTimesteps = 100000, kMaxImageFloats = int64_t(1) << 24, kMaxClasses = int64_t(1) << 20;
constexpr int64_t kMaxCorrectorSteps = 1000;

std::string str(double v) {  // for a message: 2, 0.5, 1e-20, nan, inf
  char text[32];
  std::snprintf(text, sizeof text, "%g", v);
  return text;
}

// The metadata_props of an ONNX file (ModelProto field 14, entries StringStringEntryProto {1: key, 2: value}; the
// last of a repeated key wins, as in ONNX Runtime), read from the protobuf wire format without ONNX Runtime, so that
// the metadata is checked and bounded before a session is built from a file that may be hostile, and a refused file
// costs no graph parse. The other top-level fields, the graph among them, are skipped over.
std::map<std::string, std::string> read_metadata_props(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  need(bool(f), "cannot read " + path);
  const std::string foreign = "cannot load " + path + ": not an ONNX model (truncated, or another format)";
  f.seekg(0, std::ios::end);
  const uint64_t size = uint64_t(f.tellg());
  f.seekg(0);
  const auto varint = [&](const auto& next_byte) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      const int b = next_byte();
      need(b >= 0, foreign);
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    throw Error(foreign);
  };
  const auto file_byte = [&] { return f.get(); };  // EOF is -1
  constexpr uint64_t kMaxMetadataBytes = uint64_t(1) << 26;
  uint64_t metadata_bytes = 0;
  std::map<std::string, std::string> props;
  while (f.peek() != std::char_traits<char>::eof()) {
    const uint64_t key = varint(file_byte), wire = key & 7;
    uint64_t skip = wire == 1 ? 8 : wire == 5 ? 4 : 0;
    if (wire == 0) varint(file_byte);
    else if (wire == 2) skip = varint(file_byte);
    else need(wire == 1 || wire == 5, foreign);  // groups (3, 4) are not in ONNX's schema
    const uint64_t at = uint64_t(f.tellg());
    need(f.good() && skip <= size - at, foreign);
    if (key >> 3 != 14 || wire != 2) {
      f.seekg(std::streamoff(skip), std::ios::cur);
      continue;
    }
    metadata_bytes += skip;
    need(metadata_bytes <= kMaxMetadataBytes, path + ": more than " + std::to_string(kMaxMetadataBytes) + " bytes of metadata");
    std::string entry(skip, '\0');
    need(bool(f.read(&entry[0], std::streamsize(skip))), foreign);
    size_t i = 0;
    const auto entry_byte = [&] { return i < entry.size() ? int(uint8_t(entry[i++])) : -1; };
    std::string fields[3];  // 1: key, 2: value
    while (i < entry.size()) {
      const uint64_t k = varint(entry_byte), w = k & 7;
      const uint64_t n = w == 2 ? varint(entry_byte) : w == 0 ? (varint(entry_byte), 0) : w == 1 ? 8 : w == 5 ? 4 : ~0ull;
      need(n <= entry.size() - i, foreign);
      if (w == 2 && (k >> 3 == 1 || k >> 3 == 2)) fields[k >> 3] = entry.substr(i, n);
      i += n;
    }
    props[fields[1]] = fields[2];
  }
  return props;
}

// One JSON string from s[i], just after its opening quote, to the closing one, as Python's json reads it: escapes
// decoded to UTF-8 (a surrogate pair joined; a lone surrogate as its 3 bytes); a bad escape, a control character
// or the end of s is an Error.
std::string json_string(const std::string& s, size_t& i, const std::string& bad) {
  const auto hex4 = [&](size_t at) {
    uint32_t v = 0;
    for (size_t k = at; k < at + 4; ++k) {
      need(k < s.size() && std::isxdigit(uint8_t(s[k])), bad);
      v = v << 4 | uint32_t(std::isdigit(uint8_t(s[k])) ? s[k] - '0' : (s[k] | 0x20) - 'a' + 10);
    }
    return v;
  };
  static const char kEscaped[] = "\"\\/bfnrt", kMeant[] = "\"\\/\b\f\n\r\t";
  std::string out;
  for (char c; need(i < s.size(), bad), (c = s[i++]) != '"';) {
    need(uint8_t(c) >= 0x20, bad);
    if (c != '\\') {
      out += c;
      continue;
    }
    need(i < s.size() && s[i] != 0, bad);
    const char e = s[i++];
    if (const char* plain = std::strchr(kEscaped, e)) {
      out += kMeant[plain - kEscaped];
      continue;
    }
    need(e == 'u', bad);
    uint32_t u = hex4(i);
    i += 4;
    if (u >= 0xD800 && u < 0xDC00 && s.compare(i, 2, "\\u") == 0) {  // a high surrogate, and a low one after it?
      const uint32_t low = hex4(i + 2);
      if (low >= 0xDC00 && low < 0xE000) u = 0x10000 + ((u - 0xD800) << 10) + (low - 0xDC00), i += 6;
    }
    static const uint8_t kLead[4] = {0x00, 0xC0, 0xE0, 0xF0};
    const int extra = u < 0x80 ? 0 : u < 0x800 ? 1 : u < 0x10000 ? 2 : 3;
    out += char(kLead[extra] | u >> (6 * extra));
    for (int k = extra - 1; k >= 0; --k) out += char(0x80 | ((u >> (6 * k)) & 0x3F));
  }
  return out;
}

// ddpm.class_names: a JSON list of exactly K strings (json.dumps of the exporter's names), parsed strictly: other
// JSON is an Error, and the parse stops at a K+1st name, so that a hostile list costs no more than K names (and
// no recursion: nested lists are refused at their first bracket).
std::vector<std::string> parse_class_names(const std::string& s, int64_t K, const std::string& in) {
  const std::string bad = in + "ddpm.class_names must be a JSON list of ddpm.num_classes = " + std::to_string(K) + " strings";
  size_t i = 0;
  const auto skip = [&] { i = std::min(s.find_first_not_of(" \t\n\r", i), s.size()); };  // JSON's white space
  const auto next = [&](char c) { return skip(), i < s.size() && s[i] == c ? (++i, true) : false; };
  std::vector<std::string> names;
  need(next('['), bad);
  if (!next(']')) {
    do {
      need(int64_t(names.size()) < K && next('"'), bad);
      names.push_back(json_string(s, i, bad));
    } while (next(','));
    need(next(']'), bad);
  }
  skip();
  need(i == s.size() && int64_t(names.size()) == K, bad);
  return names;
}

ModelInfo read_metadata(const std::map<std::string, std::string>& props, const std::string& path) {
  const auto has = [&](const std::string& key) { return props.count("ddpm." + key) > 0; };
  const auto get = [&](const std::string& key) -> const std::string& {
    const auto it = props.find("ddpm." + key);
    need(it != props.end(), path + " is not a DDPM model: metadata key 'ddpm." + key + "' is missing (make it with ddpm export)");
    return it->second;
  };
  const std::string in = path + ": ";
  need(get("format") == "1", in + "ddpm.format is not 1; this runner reads format 1");
  ModelInfo m;
  const std::string betas = get("betas");  // counted before it is split: a hostile file may hold millions of commas
  const int64_t T = parse_int(get("num_timesteps"), in + "ddpm.num_timesteps");
  need(T >= 1 && T <= kMaxTimesteps, in + "ddpm.num_timesteps must be in 1.." + std::to_string(kMaxTimesteps));
  need(std::count(betas.begin(), betas.end(), ',') + 1 == T, in + "ddpm.num_timesteps differs from the number of ddpm.betas");
  for (const auto& b : split(betas)) m.betas.push_back(parse_double(b, in + "ddpm.betas"));
  need(std::all_of(m.betas.begin(), m.betas.end(), [](double b) { return b > 0 && b <= 1; }),
       in + "ddpm.betas must lie in (0, 1]");
  m.parameterization = get("parameterization"), m.variance = get("variance");
  need(one_of(m.parameterization, {"eps", "x0", "v"}), in + "unknown ddpm.parameterization '" + printable(m.parameterization) + "'");
  double abar_T = 1.0;
  for (double b : m.betas) abar_T *= 1.0 - b;
  need(abar_T > 0 || m.parameterization != "eps", in + "zero terminal SNR (alpha_bar_T = 0) needs the v or x0 parameterization");
  need(one_of(m.variance, {"fixed_small", "fixed_large", "learned_range"}), in + "unknown ddpm.variance '" + printable(m.variance) + "'");
  const auto shape = split(get("image_shape"));
  need(shape.size() == 3, in + "ddpm.image_shape must be C,H,W");
  m.C = parse_int(shape[0], in + "ddpm.image_shape"), m.H = parse_int(shape[1], in + "ddpm.image_shape");
  m.W = parse_int(shape[2], in + "ddpm.image_shape");
  // One factor at a time, so that the product cannot overflow.
  need(m.C >= 1 && m.H >= 1 && m.W >= 1 && m.C <= kMaxImageFloats && m.H <= kMaxImageFloats / m.C &&
       m.W <= kMaxImageFloats / (m.C * m.H), in + "ddpm.image_shape must be positive with C*H*W <= " + std::to_string(kMaxImageFloats));
  const std::string clip = get("clip_denoised");
  need(one_of(clip, {"true", "false"}), in + "ddpm.clip_denoised must be true or false");
  m.clip_denoised = clip == "true";
  need(get("timestep_dtype") == "int64", in + "ddpm.timestep_dtype must be int64");
  if (has("num_classes") || has("null_label")) {
    m.num_classes = parse_int(get("num_classes"), in + "ddpm.num_classes");
    need(m.num_classes >= 0 && m.num_classes <= kMaxClasses && parse_int(get("null_label"), in + "ddpm.null_label") == m.num_classes,
         in + "ddpm.num_classes K (at most " + std::to_string(kMaxClasses) + ") and ddpm.null_label K must agree");
  }
  if (has("class_names")) m.class_names = parse_class_names(get("class_names"), m.num_classes, in);
  return m;  // other keys (ddpm.version, ddpm.data_range, ...) are not needed here and are ignored
}

// One input or output of the graph as ONNX Runtime reports it; dims of -1 are symbolic or unknown.
struct Port {
  std::string name;
  bool tensor = false;
  ONNXTensorElementDataType dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
};

Port port(const std::string& name, const Ort::TypeInfo& type) {
  Port p;
  p.name = name;
  p.tensor = type.GetONNXType() == ONNX_TYPE_TENSOR;  // a sequence or map has no tensor info to ask for
  if (p.tensor) {
    const auto info = type.GetTensorTypeAndShapeInfo();
    p.dtype = info.GetElementType(), p.dims = info.GetShape();
  }
  return p;
}

std::string describe(const Port& p) {
  if (!p.tensor) return "not a tensor";
  const char* dtype = p.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? "float32"
                      : p.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64   ? "int64"
                      : p.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE  ? "float64"
                      : p.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? "float16"
                      : p.dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32   ? "int32"
                                                                         : "another dtype";
  std::string s = std::string(dtype) + " [";
  for (size_t i = 0; i < p.dims.size(); ++i) s += (i ? ", " : "") + (p.dims[i] < 0 ? std::string("?") : std::to_string(p.dims[i]));
  return s + "]";
}

// The inputs (by name) and outputs (in order) of a graph, as ONNX Runtime or the OpenVINO engine reports them.
struct Ports {
  std::map<std::string, Port> inputs;
  std::vector<Port> outputs;
};

Ports session_ports(const Ort::Session& session) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ports ports;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    const std::string name = session.GetInputNameAllocated(i, alloc).get();
    ports.inputs[name] = port(name, session.GetInputTypeInfo(i));
  }
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    ports.outputs.push_back(port(session.GetOutputNameAllocated(i, alloc).get(), session.GetOutputTypeInfo(i)));
  return ports;
}

Ports openvino_ports(const OpenVinoNetwork& network) {
  Ports ports;
  const auto to_port = [](const TensorPort& t) { return Port{t.name, true, ONNXTensorElementDataType(t.onnx_type), t.dims}; };
  for (const TensorPort& t : network.inputs()) ports.inputs[t.name] = to_port(t);
  for (const TensorPort& t : network.outputs()) ports.outputs.push_back(to_port(t));
  return ports;
}

// The graph is eps_theta as docs/internals.md specifies, for this metadata: x float32 [B, C, H, W], t int64 [B] (and y int64
// [B] for a class-conditional model) -> model_output float32 [B, C_out, H, W], C_out = 2C for learned_range.
// Symbolic dims pass here; the engine checks them against the buffers at run time.
void check_graph(Ports ports, const ModelInfo& m, const std::string& path) {
  auto& inputs = ports.inputs;
  std::vector<std::string> names;
  for (const auto& kv : inputs) names.push_back(kv.first);
  need(names == (m.num_classes ? std::vector<std::string>{"t", "x", "y"} : std::vector<std::string>{"t", "x"}),
       path + (m.num_classes ? ": the inputs must be x, t and y (an exported class-conditional eps_theta)"
                             : ": the inputs must be x and t (an exported eps_theta)"));
  need(ports.outputs.size() == 1 && ports.outputs[0].name == "model_output",
       path + ": the graph must have one output, model_output (an exported eps_theta)");
  const Port& out = ports.outputs[0];
  const auto fits = [](const Port& p, ONNXTensorElementDataType dtype, std::vector<int64_t> want) {
    if (!p.tensor || p.dtype != dtype || p.dims.size() != want.size()) return false;
    for (size_t i = 0; i < want.size(); ++i)
      if (p.dims[i] >= 0 && want[i] >= 0 && p.dims[i] != want[i]) return false;
    return true;
  };
  const auto expect = [&](const Port& p, ONNXTensorElementDataType dtype, std::vector<int64_t> want, const std::string& what) {
    need(fits(p, dtype, want), path + ": " + p.name + " must be " + what + ", the graph has " + describe(p));
  };
  const std::string chw = std::to_string(m.C) + ", " + std::to_string(m.H) + ", " + std::to_string(m.W);
  expect(inputs["x"], ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {-1, m.C, m.H, m.W}, "float32 [B, " + chw + "] (ddpm.image_shape)");
  expect(inputs["t"], ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {-1}, "int64 [B]");
  if (m.num_classes) expect(inputs["y"], ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {-1}, "int64 [B]");
  expect(out, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {-1, m.out_channels(), m.H, m.W},
         "float32 [B, " + std::to_string(m.out_channels()) + ", " + std::to_string(m.H) + ", " + std::to_string(m.W) +
         "] (C_out = " + (m.variance == "learned_range" ? "2C for ddpm.variance learned_range" : "C for ddpm.variance " + m.variance) + ")");
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

// lambda = log(alpha / sigma) = log(ab / (1 - ab)) / 2, DPM-Solver's time variable: +inf at ab = 1.
double log_snr(double ab) { return 0.5 * (std::log(ab) - std::log1p(-ab)); }

// DPM-Solver keeps the timesteps with lambda >= this; the logsnr spacing spans lambda down to it at most
// (export/onnx_sampler.py's LAMBDA_MIN).
constexpr double kLambdaMin = -5.1;

struct Row {
  double mean_xt, mean_x0, sigma;
  std::vector<double> prev;  // the weights of the earlier x0s, the latest first
};

// DPM-Solver++(2M) (Lu et al. 2022) from ab to ab_to with r = h_prev / h (inf: first order) on
// D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev. ODE: x_to = (sigma_to / sigma) x_t - alpha_to (e^-h - 1) D;
// SDE: x_to = (sigma_to / sigma) e^-h x_t + alpha_to (1 - e^-2h) D + sigma_to sqrt(1 - e^-2h) z.
Row dpmpp_2m(double ab, double ab_to, double r, bool sde) {
  const double alpha_to = std::sqrt(ab_to), sigma_to = std::sqrt(1.0 - ab_to), sigma = std::sqrt(1.0 - ab);
  const double h = log_snr(ab_to) - log_snr(ab);
  const double weight = sde ? -std::expm1(-2.0 * h) : -std::expm1(-h);
  const double half_r = std::isinf(r) ? 0.0 : 0.5 / r;
  return {sigma_to / sigma * (sde ? std::exp(-h) : 1.0), alpha_to * weight * (1.0 + half_r),
          sde ? sigma_to * std::sqrt(weight) : 0.0, {-alpha_to * weight * half_r}};
}

// DPM-Solver++(3M) (diffusers' multistep_dpm_solver_third_order_update) from ab to ab_to, r0 = h_0 / h, r1 = h_1 / h:
// D1_0 = (x0 - x0_1) / r0, D1_1 = (x0_1 - x0_2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
// D2 = (D1_0 - D1_1) / (r0 + r1);
// x_to = (sigma_to / sigma) x_t - alpha_to phi_1 x0 + alpha_to phi_2 D1 - alpha_to phi_3 D2.
Row dpmpp_3m(double ab, double ab_to, double r0, double r1) {
  const double alpha_to = std::sqrt(ab_to), sigma_to = std::sqrt(1.0 - ab_to), sigma = std::sqrt(1.0 - ab);
  const double h = log_snr(ab_to) - log_snr(ab);
  const double phi_1 = std::expm1(-h), phi_2 = phi_1 / h + 1.0, phi_3 = phi_2 / h - 0.5;
  const double d1_0 = alpha_to * (phi_2 * (1.0 + r0 / (r0 + r1)) - phi_3 / (r0 + r1));  // the weights of D1_0, D1_1
  const double d1_1 = alpha_to * (phi_3 / (r0 + r1) - phi_2 * r0 / (r0 + r1));
  return {sigma_to / sigma, d1_0 / r0 - alpha_to * phi_1, 0.0, {d1_1 / r1 - d1_0 / r0, -d1_1 / r1}};
}

// DPM-Solver++ rows in sampling order over ab (the kept alpha_bar in sampling order), with diffusers' orders: 1, 2,
// then 2 (2M) or 3 (3M); 1 for the last step, to ab = 1; 3M under 15 steps: at most 2 for the one before it.
std::vector<Row> dpmpp_rows(const std::vector<double>& ab, bool sde, bool third) {
  const int64_t S = ab.size();
  std::vector<double> h(S);  // lambda_{k+1} - lambda_k; inf at the end
  for (int64_t k = 0; k < S; ++k) h[k] = (k + 1 < S ? log_snr(ab[k + 1]) : INFINITY) - log_snr(ab[k]);
  std::vector<Row> rows;
  for (int64_t k = 0; k < S; ++k) {
    int64_t order = std::min<int64_t>(k + 1, third ? 3 : 2);
    if (k == S - 2 && S < 15) order = std::min<int64_t>(order, 2);
    if (k == S - 1) order = 1;
    const double ab_to = k + 1 < S ? ab[k + 1] : 1.0;
    if (order == 3) {
      rows.push_back(dpmpp_3m(ab[k], ab_to, h[k - 1] / h[k], h[k - 2] / h[k]));
    } else {
      rows.push_back(dpmpp_2m(ab[k], ab_to, order == 2 ? h[k - 1] / h[k] : INFINITY, sde));
      rows.back().prev.resize(third ? 2 : 1, 0.0);
    }
  }
  return rows;
}

// phi_k(z) = (e^z - sum_{m < k} z^m / m!) / z^k, as its series sum_m z^m / (m + k)! where |z| < 1.
double phi(double z, int k) {
  double factorial = 1.0, sum = 0.0;
  if (std::abs(z) >= 1.0) {
    for (int m = 1; m < k; ++m) sum += std::pow(z, m) / (factorial *= m);
    return (std::expm1(z) - sum) / std::pow(z, k);
  }
  for (int m = 2; m <= k; ++m) factorial *= m;
  double term = 1.0 / factorial;
  for (int m = 1; m < 30; ++m) {
    sum += term;
    term *= z / double(m + k);
  }
  return sum;
}

// The solution x of sum_i a[k][i] x_i = a[k][n], k < n <= 3: Gaussian elimination with partial pivoting.
using System = std::array<std::array<double, 4>, 3>;
std::vector<double> solve(System a, size_t n) {
  for (size_t c = 0; c < n; ++c) {
    size_t pivot = c;
    for (size_t k = c + 1; k < n; ++k)
      if (std::abs(a[k][c]) > std::abs(a[pivot][c])) pivot = k;
    std::swap(a[c], a[pivot]);
    for (size_t k = c + 1; k < n; ++k) {
      const double f = a[k][c] / a[c][c];
      for (size_t i = c; i <= n; ++i) a[k][i] -= f * a[c][i];
    }
  }
  std::vector<double> x(n);
  for (size_t k = n; k-- > 0;) {
    double v = a[k][n];
    for (size_t i = k + 1; i < n; ++i) v -= a[k][i] * x[i];
    x[k] = v / a[k][k];
  }
  return x;
}

// One step of UniPC (bh2, data prediction; export/onnx_sampler.unipc_coefficients) from lambda to lambda + h with
// r_i = (lambda_i - lambda) / h of the earlier x0s: the weights of x0_to (UniC only), x0, x0_1, ..., x0_{p-1} in
// x_to = (sigma_to / sigma) x_t - alpha_to B x0 - alpha_to B sum_i rho_i (x0_i - x0) / r_i, B = e^-h - 1.
std::vector<double> unipc_step(double h, std::vector<double> r, double alpha_to, bool corrector) {
  const double B = std::expm1(-h);
  std::vector<double> weights(r.size() + 2, 0.0);
  weights[1] = -alpha_to * B;
  if (corrector) r.push_back(1.0);
  if (r.empty()) return weights;
  std::vector<double> rho = {0.5};
  if (r.size() > 1) {  // UniP-3 (2 unknowns) or UniC-2, UniC-3
    const size_t n = r.size();
    System system{};
    double factorial = 1.0;
    for (size_t k = 0; k < n; ++k) {
      for (size_t i = 0; i < n; ++i) system[k][i] = std::pow(r[i], double(k));
      system[k][n] = (factorial *= double(k + 1)) * phi(-h, int(k) + 2) / phi(-h, 1);
    }
    rho = solve(system, n);
  }
  for (size_t i = 0; i < r.size(); ++i) {
    const double w = alpha_to * B * rho[i] / r[i];
    weights[corrector && i + 1 == r.size() ? 0 : i + 2] -= w;
    weights[1] += w;
  }
  return weights;
}

// UniPC-3 rows in sampling order over ab (export/onnx_sampler._unipc_rows): step k of order min(3, k + 1, S - k);
// UniC corrects x_k by the difference of its weights and those of the UniP step that gave x_k.
std::vector<Row> unipc_rows(std::vector<double> ab) {
  const int64_t S = ab.size();
  ab.push_back(1.0);
  std::vector<double> lam(S + 1);
  for (int64_t k = 0; k <= S; ++k) lam[k] = log_snr(ab[k]);
  const auto order = [S](int64_t k) { return std::min<int64_t>({3, k + 1, S - k}); };
  const auto step = [&](int64_t j, int64_t p, bool corrector) {
    const double h = lam[j + 1] - lam[j];
    std::vector<double> r;
    for (int64_t i = 1; i < p; ++i) r.push_back((lam[j - i] - lam[j]) / h);
    return unipc_step(h, r, std::sqrt(ab[j + 1]), corrector);
  };
  std::vector<Row> rows;
  for (int64_t k = 0; k < S; ++k) {
    const double ratio = std::sqrt(1.0 - ab[k + 1]) / std::sqrt(1.0 - ab[k]);
    std::vector<double> weights(4, 0.0), p = step(k, order(k), false);  // of x0_k, x0_{k-1}, x0_{k-2}, x0_{k-3}
    std::copy(p.begin() + 1, p.end(), weights.begin());
    if (k) {
      std::vector<double> correction = step(k - 1, order(k - 1), true);
      const std::vector<double> predictor = step(k - 1, order(k - 1), false);
      for (size_t i = 1; i < correction.size(); ++i) correction[i] -= predictor[i];
      for (size_t i = 0; i < correction.size(); ++i) weights[i] += ratio * correction[i];
    }
    rows.push_back({ratio, weights[0], 0.0, {weights[1], weights[2], weights[3]}});
  }
  return rows;
}

// A Langevin corrector row at ab (Song et al. 2021): x' = x + e score + sqrt(2e) z, score = -(x - sqrt(ab) x0)
// / (1 - ab), e = 2 (snr sqrt(1 - ab))^2: coefficients of x_t and x0, and the noise's standard deviation.
Row langevin(double ab, double snr) {
  return {1.0 - 2.0 * (snr * snr), 2.0 * (snr * snr) * std::sqrt(ab), 2.0 * snr * std::sqrt(1.0 - ab), {}};
}

// One row on b images in float32, the coefficients cast to float32: x0 = clip(x0_x x + x0_o out[:C]);
// x = mean_x0 x0 + mean_xt x, then + w_j x0_j for the earlier x0s (the latest first), in that order; x0 is
// kept in x0_out when the plan has memory. Branch-free so that it vectorises (clipping to +-inf leaves x0).
void step_mean(const Plan& p, const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out,
               float* x0_out, const std::vector<const float*>& earlier) {
  const float ax = float(s.x0_x), ao = float(s.x0_o), m0 = float(s.mean_x0), mt = float(s.mean_xt);
  const float lo = p.clip ? -1.0f : -INFINITY, hi = p.clip ? 1.0f : INFINITY;
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float* oi = out + i * out_chw;
    if (earlier.empty()) {
      for (int64_t j = 0; j < chw; ++j) xi[j] = m0 * std::min(std::max(ax * xi[j] + ao * oi[j], lo), hi) + mt * xi[j];
      continue;
    }
    for (int64_t j = 0; j < chw; ++j) x0_out[i * chw + j] = std::min(std::max(ax * xi[j] + ao * oi[j], lo), hi);
    for (int64_t j = 0; j < chw; ++j) xi[j] = m0 * x0_out[i * chw + j] + mt * xi[j];
    for (size_t m = 0; m < earlier.size(); ++m) {
      const float w = float(s.mean_x0_prev[m]), *e = earlier[m] + i * chw;
      for (int64_t j = 0; j < chw; ++j) xi[j] = xi[j] + w * e[j];
    }
  }
}

// x += s z, with s = sigma, or on learned rows s = exp(0.5 (frac log_var_max + (1 - frac) log_var_min)),
// frac = (v + 1) / 2 and v the second C output channels (Nichol & Dhariwal Eq. 15).
void step_noise(const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out, const float* z) {
  const float sigma = float(s.sigma), lmin = float(s.log_var_min), lmax = float(s.log_var_max);
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float *vi = out + i * out_chw + chw, *zi = z + i * chw;
    if (!s.learned) {
      for (int64_t j = 0; j < chw; ++j) xi[j] = xi[j] + sigma * zi[j];
    } else {
      for (int64_t j = 0; j < chw; ++j) {
        const float frac = (vi[j] + 1.0f) / 2.0f;
        xi[j] = xi[j] + std::exp(0.5f * (frac * lmax + (1.0f - frac) * lmin)) * zi[j];
      }
    }
  }
}

// Classifier-free guidance of a [2B] output (the conditional half, then the unconditional one) into `into` [B]:
// o_u + s (o_c - o_u) on the prediction channels, the conditional half's variance channels.
const float* guide(const float* out, int64_t b, int64_t chw, int64_t out_chw, float s, float* into) {
  for (int64_t i = 0; i < b; ++i) {
    const float *c = out + i * out_chw, *u = out + (b + i) * out_chw;
    float* o = into + i * out_chw;
    for (int64_t j = 0; j < chw; ++j) o[j] = u[j] + s * (c[j] - u[j]);
    std::copy(c + chw, c + out_chw, o + chw);
  }
  return into;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}


// ---- the update of one step as an ONNX graph, so that it runs on the provider's device -------------------
// Protobuf by hand (varints and length-delimited fields) keeps the build free of onnx/protobuf.
std::string varint(uint64_t n) {
  std::string s;
  for (; n > 0x7f; n >>= 7) s += char((n & 0x7f) | 0x80);
  return s + char(n);
}
std::string field(int number, uint64_t value) { return varint(uint64_t(number) << 3) + varint(value); }
std::string field(int number, const std::string& bytes) {
  return varint(uint64_t(number) << 3 | 2) + varint(bytes.size()) + bytes;
}

// ValueInfoProto of a float tensor with symbolic dims.
std::string float_tensor(const std::string& name, std::initializer_list<const char*> dims) {
  std::string shape;
  for (const char* d : dims) shape += field(1, field(2, d));
  return field(1, name) + field(2, field(1, field(1, 1) + field(2, shape)));
}

// NodeProto from "Op in... -> out...": Split of a network output splits channels (axis 1), Halve the batch
// (a Split on axis 0) and Concat joins along the batch.
std::string node(const std::string& statement) {
  std::stringstream words(statement);
  std::string op, word, inputs, outputs;
  words >> op;
  for (bool out = false; words >> word;)
    if (word == "->") out = true;
    else (out ? outputs : inputs) += field(out ? 2 : 1, word);
  const int axis = op == "Halve" || op == "Concat" ? 0 : op == "Split" && inputs != field(1, "c") ? 1 : -1;
  if (op == "Halve") op = "Split";
  return inputs + outputs + field(4, op) + (axis >= 0 ? field(5, field(1, "axis") + field(3, axis) + field(20, 2)) : "");
}

// x_next = mean_x0 x0 + mean_xt x + w_1 x0_1 + ... + w_M x0_M + s z with x0 = clip(x0_x x + x0_o o), s = sigma
// or, when learned, Nichol & Dhariwal's Eq. (15) from the variance channels v; the float32 operations of
// step_mean and step_noise, in order. c = [x0_x, x0_o, mean_x0, mean_xt, sigma, log_var_min, log_var_max, lo,
// hi, 1, 0.5, w_1..w_M]; z = 0 when no noise is added; with M > 0 the graph also outputs x0. Opset 17, the
// update export/onnx_sampler.py builds, plus bad_next = bad + sum(out - out): NaN from the first row whose
// network output holds NaN or inf on, kept on the device and read once per batch.
std::string step_graph(bool learned, bool split_output, int64_t memory, bool guided) {
  std::string text = "Split c -> x0_x x0_o mean_x0 mean_xt sigma log_var_min log_var_max lo hi one half";
  for (int64_t j = 1; j <= memory; ++j) text += " w" + std::to_string(j);
  if (guided)  // out is [2B]: the conditional, then the unconditional half; o = o_u + scale (o_c - o_u)
    text += std::string("; Halve out -> cond uncond;") +
            (split_output ? "Split cond -> oc v; Split uncond -> ou vu;" : "Identity cond -> oc; Identity uncond -> ou;") +
            "Sub oc ou -> gd; Mul scale gd -> gsd; Add ou gsd -> o;";
  else
    text += split_output ? "; Split out -> o v;" : "; Identity out -> o;";
  text += "Mul x0_x x -> a; Mul x0_o o -> b; Add a b -> x0u; Max x0u lo -> x0l; Min x0l hi -> x0;"
          "Mul mean_x0 x0 -> m1; Mul mean_xt x -> m2; Add m1 m2 -> mean0;";
  for (int64_t j = 1; j <= memory; ++j) {
    const std::string n = std::to_string(j);
    text += "Mul w" + n + " x0_" + n + " -> q" + n + "; Add mean" + std::to_string(j - 1) + " q" + n + " -> mean" + n + ";";
  }
  text += learned ? "Add v one -> f1; Mul f1 half -> frac; Mul frac log_var_max -> p1; Sub one frac -> q;"
                    "Mul q log_var_min -> p2; Add p1 p2 -> p; Mul half p -> ph; Exp ph -> s;"
                  : "Identity sigma -> s;";
  text += "Mul s z -> n; Add mean" + std::to_string(memory) + " n -> x_next;";
  text += "Sub out out -> nonfinite; ReduceSum nonfinite -> nonfinite_sum; Add bad nonfinite_sum -> bad_next";
  if (guided) text += "; Concat x_next x_next -> x_pair";
  std::string graph;
  std::stringstream statements(text);
  for (std::string statement; std::getline(statements, statement, ';');) graph += field(1, node(statement));
  graph += field(2, "ddpm_step") + field(11, float_tensor("x", {"B", "C", "H", "W"})) +
           field(11, float_tensor("out", {guided ? "B2" : "B", "C_out", "H", "W"})) +
           field(11, float_tensor("z", {"B", "C", "H", "W"})) + field(11, float_tensor("c", {"K"})) +
           field(11, float_tensor("bad", {"1", "1", "1", "1"}));
  for (int64_t j = 1; j <= memory; ++j) graph += field(11, float_tensor("x0_" + std::to_string(j), {"B", "C", "H", "W"}));
  if (guided) graph += field(11, float_tensor("scale", {"1"}));
  graph += field(12, float_tensor("x_next", {"B", "C", "H", "W"})) + field(12, float_tensor("bad_next", {"1", "1", "1", "1"}));
  if (memory) graph += field(12, float_tensor("x0", {"B", "C", "H", "W"}));
  if (guided) graph += field(12, float_tensor("x_pair", {"B2", "C", "H", "W"}));
  return field(1, 8) + field(8, field(1, "") + field(2, 17)) + field(7, graph);
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

SamplerKind parse_sampler(const std::string& name) { return parse_name<SamplerKind>(name, kSamplers, "sampler"); }
Spacing parse_spacing(const std::string& name) { return parse_name<Spacing>(name, kSpacings, "spacing"); }
Provider parse_provider(const std::string& name) { return parse_name<Provider>(name, kProviders, "provider"); }
Engine parse_engine(const std::string& name) { return parse_name<Engine>(name, kEngines, "engine"); }
Precision parse_precision(const std::string& name) { return parse_name<Precision>(name, kPrecisions, "precision"); }
std::string to_string(Engine engine) { return name_of(engine, kEngines, "engine"); }
std::string to_string(Precision precision) { return name_of(precision, kPrecisions, "precision"); }
std::string to_string(SamplerKind sampler) { return name_of(sampler, kSamplers, "sampler"); }
std::string to_string(Spacing spacing) { return name_of(spacing, kSpacings, "spacing"); }
std::string to_string(Provider provider) { return name_of(provider, kProviders, "provider"); }

std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, Spacing spacing, const std::vector<double>& abar) {
  const std::string name = to_string(spacing);
  need(S >= 1 && S <= T, "steps must be in 1.." + std::to_string(T) + ", got " + std::to_string(S));
  need(spacing != Spacing::LogSnr || int64_t(abar.size()) >= T, "the logsnr spacing needs alpha_bar for all T timesteps");
  std::vector<int64_t> ts(S);
  std::iota(ts.begin(), ts.end(), 0);
  if (S == T) return ts;
  // numpy's linspace (start + i * step, the last value exactly `stop`) and round (half to even: nearbyint).
  auto linspace = [S](double start, double stop, int64_t i) {
    return S == 1 ? start : i == S - 1 ? stop : double(i) * ((stop - start) / double(S - 1)) + start;
  };
  std::vector<double> lam;
  if (spacing == Spacing::LogSnr)
    for (int64_t t = 0; t < T; ++t) lam.push_back(log_snr(abar[t]));
  for (int64_t i = 0; i < S; ++i) {
    if (spacing == Spacing::Uniform) {
      ts[i] = i * (T / S);
    } else if (spacing == Spacing::Linspace) {
      ts[i] = int64_t(std::nearbyint(linspace(0.0, double(T - 1), i)));
    } else if (spacing == Spacing::Trailing) {  // round(T - j T/S) - 1 with j = S-1-i: already ascending
      ts[i] = int64_t(std::nearbyint(double(T) - double(S - 1 - i) * (double(T) / double(S)))) - 1;
    } else if (spacing == Spacing::Quadratic) {
      const double r = linspace(0.0, std::sqrt(0.8 * double(T)), i);
      ts[i] = int64_t(r * r);
    } else {  // the timestep whose lambda is nearest to linspace(lambda_0, max(lambda_{T-1}, kLambdaMin), S)[i],
              // the first on a tie
      const double v = linspace(lam[0], std::max(lam[T - 1], kLambdaMin), i);
      int64_t best = 0;
      for (int64_t t = 1; t < T; ++t)
        if (std::abs(lam[t] - v) < std::abs(lam[best] - v)) best = t;
      ts[i] = i ? std::max(best, ts[i - 1] + 1) : best;  // one above the previous where they would coincide
    }
  }
  for (int64_t i = 0; i < S; ++i)
    need(ts[i] >= 0 && ts[i] <= T - 1 && (i == 0 || ts[i] > ts[i - 1]),
         "spacing " + name + " cannot give " + std::to_string(S) + " distinct steps for T=" + std::to_string(T));
  return ts;
}

// alpha_bar_t = prod_{s <= t} (1 - beta_s), float64, in the order of Python's cumprod.
static std::vector<double> alphas_cumprod(const ModelInfo& info) {
  std::vector<double> abar(info.betas.size());
  for (size_t i = 0; i < abar.size(); ++i) abar[i] = (i ? abar[i - 1] : 1.0) * (1.0 - info.betas[i]);
  return abar;
}

Spacing default_spacing(const ModelInfo& info) {
  const std::vector<double> abar = alphas_cumprod(info);
  return !abar.empty() && abar.back() == 0.0 ? Spacing::Trailing : Spacing::Uniform;
}

Plan make_plan(const ModelInfo& info, const PlanOptions& opt) {
  to_string(opt.sampler);  // an Error for a value outside the enum (kept_timesteps checks the spacing)
  need(opt.eta >= 0.0 && opt.eta <= 1.0, "eta must be in [0, 1], got " + str(opt.eta));  // NaN fails, too
  need(opt.eta == 0.0 || opt.sampler == SamplerKind::Ddim, "eta applies to the ddim sampler only");
  need(opt.corrector_steps >= 0 && opt.corrector_steps <= kMaxCorrectorSteps,
       "corrector steps must be in 0.." + std::to_string(kMaxCorrectorSteps) + ", got " + std::to_string(opt.corrector_steps));
  need(opt.snr > 0 && std::isfinite(opt.snr), "snr must be a finite number > 0, got " + str(opt.snr));
  const bool ddim = opt.sampler == SamplerKind::Ddim, ancestral = opt.sampler == SamplerKind::Ancestral;
  const bool sde = opt.sampler == SamplerKind::DpmPP2MSde, unipc = opt.sampler == SamplerKind::UniPC;
  const bool third = opt.sampler == SamplerKind::DpmPP3M;
  const bool multistep = !ddim && !ancestral;
  need(!(multistep && opt.corrector_steps), "the Langevin corrector runs with the one-step samplers (ancestral, ddim): "
       "a corrector row would replace the x0s that " + to_string(opt.sampler) + " keeps from its previous steps");
  const std::vector<double> abar = alphas_cumprod(info);
  const auto finite_lambda = [](double ab) { return log_snr(ab) >= kLambdaMin; };
  const int64_t T = multistep ? std::count_if(abar.begin(), abar.end(), finite_lambda) : int64_t(abar.size());
  const int64_t S = opt.steps ? *opt.steps : ancestral ? T : std::min<int64_t>(50, T);
  const Spacing spacing = opt.spacing ? *opt.spacing : default_spacing(info);
  const std::vector<int64_t> ts = kept_timesteps(T, S, spacing, abar);
  const auto ab_prev = [&](int64_t k) { return k ? abar[ts[k - 1]] : 1.0; };
  std::vector<double> ab_sampling(S);  // the kept alpha_bar in sampling order
  for (int64_t k = 0; k < S; ++k) {
    ab_sampling[k] = abar[ts[S - 1 - k]];
    need(!multistep || k == 0 || log_snr(ab_sampling[k]) > log_snr(ab_sampling[k - 1]),
         "the kept timesteps' lambdas are not strictly decreasing (" + to_string(spacing) + ", " +
         std::to_string(S) + " steps): DPM-Solver's step h would be 0; use fewer steps or another spacing");
  }
  const std::vector<Row> rows = !multistep ? std::vector<Row>() : unipc ? unipc_rows(ab_sampling)
                                                                         : dpmpp_rows(ab_sampling, sde, third);
  Plan p;
  p.clip = opt.clip.value_or(info.clip_denoised);
  p.channels = info.C;
  p.memory = multistep ? int64_t(rows[0].prev.size()) : 0;
  for (int64_t i = S - 1; i >= 0; --i) {  // kept timestep i, sampling row S-1-i
    const double ab = abar[ts[i]], ap = ab_prev(i), beta = 1.0 - ab / ap;
    const Pair x0 = x0_coefficients(ab, info.parameterization);
    // beta-tilde at i = 0 is 0: its log is clipped to the value at i = 1, as in the original implementation.
    const double log_var_min = i ? std::log(posterior_variance(ab, ap))
                               : S > 1 ? std::log(posterior_variance(abar[ts[1]], ab_prev(1))) : std::log(beta);
    Step step{ts[i], x0.a, x0.b, 0, 0, 0, log_var_min, std::log(beta), i > 0 && (!ddim || opt.eta > 0.0),
              info.variance == "learned_range" && ancestral, {}};
    if (multistep) {
      const Row& row = rows[S - 1 - i];
      step.mean_xt = row.mean_xt, step.mean_x0 = row.mean_x0, step.sigma = row.sigma;
      step.mean_x0_prev = row.prev;
      step.add_noise = step.add_noise && sde;
    } else {
      step.sigma = ddim ? ddim_sigma(ab, ap, opt.eta)
                        : std::sqrt(info.variance == "fixed_large" ? beta : posterior_variance(ab, ap));
      const Pair mean = ddim ? ddim_mean(ab, ap, step.sigma) : posterior_mean(ab, ap);
      step.mean_x0 = mean.a, step.mean_xt = mean.b;
    }
    for (int64_t j = 0; j < (i < S - 1 ? opt.corrector_steps : 0); ++j) {  // Langevin rows at t_i before its predictor
      const Row c = langevin(ab, opt.snr);
      const double log_var = 2.0 * std::log(c.sigma);
      p.steps.push_back({ts[i], x0.a, x0.b, c.mean_x0, c.mean_xt, c.sigma, log_var, log_var, true, false, {}});
    }
    p.steps.push_back(step);
  }
  return p;
}

Plan make_inversion_plan(const ModelInfo& info, std::optional<int64_t> steps, std::optional<Spacing> spacing) {
  const std::vector<double> abar = alphas_cumprod(info);
  const int64_t T = abar.size(), S = steps.value_or(std::min<int64_t>(50, T));
  const std::vector<int64_t> ts = kept_timesteps(T, S, spacing ? *spacing : default_spacing(info), abar);
  Plan p;
  p.clip = false;
  p.channels = info.C;
  for (int64_t k = 0; k + 1 < S; ++k) {
    const Pair x0 = x0_coefficients(abar[ts[k]], info.parameterization);
    const Pair mean = ddim_mean(abar[ts[k]], abar[ts[k + 1]], 0.0);
    p.steps.push_back({ts[k], x0.a, x0.b, mean.a, mean.b, 0.0, 0.0, 0.0, false, false, {}});
  }
  return p;
}
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

// x stays in the result on the host; the network writes into a host buffer and the update is one fused loop.
// The last M x0 predictions are a ring of M + 1 buffers (zeros before the first row).
double Sampler::Impl::run_batch_on_host(const Plan& p, int64_t b, float* x, bool draw_x_T, RandomState& rng,
                                        const Tick& tick, Labels& labels) {
  const int64_t C = info_.C, Co = info_.out_channels(), chw = C * info_.H * info_.W, out_chw = Co * info_.H * info_.W;
  const int64_t nb = labels.guided ? 2 * b : b;  // the network's batch
  const int64_t x_shape[4] = {nb, C, info_.H, info_.W}, out_shape[4] = {nb, Co, info_.H, info_.W};
  std::vector<float> out(nb * out_chw), z(b * chw), pair(labels.guided ? nb * chw : 0), guided_out(labels.guided ? b * out_chw : 0);
  std::vector<std::vector<float>> x0s(p.memory ? p.memory + 1 : 0, std::vector<float>(b * chw, 0.0f));
  std::vector<int64_t> t(nb);
  const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const Ort::Value inputs[3] = {Ort::Value::CreateTensor<float>(mem, labels.guided ? pair.data() : x, nb * chw, x_shape, 4),
                                Ort::Value::CreateTensor<int64_t>(mem, t.data(), nb, &nb, 1),
                                Ort::Value::CreateTensor<int64_t>(mem, labels.y.data(), labels.y.size(), &nb, 1)};
  Ort::Value output = Ort::Value::CreateTensor<float>(mem, out.data(), nb * out_chw, out_shape, 4);
  const char* input_names[3] = {"x", "t", "y"};
  const size_t n_inputs = info_.num_classes ? 3 : 2;
  const char* output_name = "model_output";
  double network_s = 0.0;
  if (draw_x_T) rng.fill_normal(x, b * chw);
  const int64_t ring = p.memory + 1;
  std::vector<const float*> earlier(p.memory);
  for (size_t k = 0; k < p.steps.size(); ++k) {
    const Step& s = p.steps[k];
    std::fill(t.begin(), t.end(), s.t);
    std::future<void> drawn = s.add_noise ? draw_noise(rng, z.data(), b * chw, spare_core_) : std::future<void>();
    if (labels.guided) {  // [x; x]
      std::copy(x, x + b * chw, pair.begin());
      std::copy(x, x + b * chw, pair.begin() + b * chw);
    }
    const auto r0 = std::chrono::steady_clock::now();
    if (openvino_)
      openvino_->run(labels.guided ? pair.data() : x, t.data(), info_.num_classes ? labels.y.data() : nullptr, x_shape,
                     out.data(), out_shape);
    else
      session_.Run(Ort::RunOptions{nullptr}, input_names, inputs, n_inputs, &output_name, &output, 1);
    network_s += seconds_since(r0);
    need_finite_output(all_finite(out.data(), out.size()), "row " + std::to_string(k) + ", t = " + std::to_string(s.t));
    const float* o = labels.guided ? guide(out.data(), b, chw, out_chw, labels.scale, guided_out.data()) : out.data();
    for (int64_t j = 1; j <= p.memory; ++j) earlier[j - 1] = x0s[(int64_t(k) - j + ring * j) % ring].data();
    step_mean(p, s, b, chw, out_chw, x, o, p.memory ? x0s[k % ring].data() : nullptr, earlier);
    if (drawn.valid()) {
      drawn.get();
      step_noise(s, b, chw, out_chw, x, o, z.data());
    }
    tick(k + 1);
  }
  return network_s;
}

// x, the network output, the earlier x0s and the update stay on the provider's device (IO binding; the update
// is the ONNX graph of step_graph): per row only t, the coefficients and z (when drawn) go to the device, and x
// comes back once, after the last row, with the finiteness sum. On the CPU the same path runs with host memory
// (tested with --step-graph).
double Sampler::Impl::run_batch_on_provider(const Plan& p, int64_t b, float* x_out, bool draw_x_T,
                                            RandomState& rng, const Tick& tick, Labels& labels) {
  const int64_t n_c = 11 + p.memory, chw = info_.C * info_.H * info_.W, ring = p.memory + 1;
  const int64_t nb = labels.guided ? 2 * b : b;  // the network's batch
  const int64_t x_shape[4] = {b, info_.C, info_.H, info_.W}, out_shape[4] = {nb, info_.out_channels(), info_.H, info_.W};
  const int64_t pair_shape[4] = {nb, info_.C, info_.H, info_.W}, one = 1, scalar_shape[4] = {1, 1, 1, 1};
  const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<float> x_T(nb * chw), z(b * chw), zeros(b * chw, 0.0f), c(n_c);
  std::vector<int64_t> t(nb);
  float scale = labels.scale, bad_start = 0.0f, bad_end = 0.0f;
  const auto host = [&](float* data, int64_t count, const int64_t* shape, size_t rank) {
    return Ort::Value::CreateTensor<float>(mem, data, count, shape, rank);
  };
  const Ort::Value xT_v = host(x_T.data(), b * chw, x_shape, 4), z_v = host(z.data(), b * chw, x_shape, 4);
  const Ort::Value zeros_v = host(zeros.data(), b * chw, x_shape, 4), c_v = host(c.data(), n_c, &n_c, 1);
  const Ort::Value t_v = Ort::Value::CreateTensor<int64_t>(mem, t.data(), nb, &nb, 1);
  const Ort::Value y_v = Ort::Value::CreateTensor<int64_t>(mem, labels.y.data(), labels.y.size(), &nb, 1);
  const Ort::Value xpair_v = host(x_T.data(), nb * chw, pair_shape, 4), scale_v = host(&scale, 1, &one, 1);
  const Ort::Value bad_start_v = host(&bad_start, 1, scalar_shape, 4);
  Ort::Value bad_end_v = host(&bad_end, 1, scalar_shape, 4);
  std::vector<Ort::Value> device_pair;  // guided: the network's next [x; x], written by the update
  for (int j = 0; j < (labels.guided ? 2 : 0); ++j)
    device_pair.push_back(Ort::Value::CreateTensor<float>(device_allocator_, pair_shape, 4));
  Ort::Value result_v = host(x_out, b * chw, x_shape, 4);
  Ort::Value device_x[2] = {Ort::Value::CreateTensor<float>(device_allocator_, x_shape, 4),
                            Ort::Value::CreateTensor<float>(device_allocator_, x_shape, 4)};
  Ort::Value device_bad[2] = {Ort::Value::CreateTensor<float>(device_allocator_, scalar_shape, 4),
                              Ort::Value::CreateTensor<float>(device_allocator_, scalar_shape, 4)};
  std::vector<Ort::Value> x0s;  // the ring of earlier x0s on the device; rows before the first read zeros_v
  for (int64_t j = 0; j < (p.memory ? ring : 0); ++j) x0s.push_back(Ort::Value::CreateTensor<float>(device_allocator_, x_shape, 4));
  const Ort::Value out = Ort::Value::CreateTensor<float>(device_allocator_, out_shape, 4);
  Ort::IoBinding net(session_);
  Ort::Session* step_sessions[2] = {nullptr, nullptr};
  std::unique_ptr<Ort::IoBinding> updates[2];
  for (const Step& s : p.steps)
    if (!updates[s.learned]) {
      step_sessions[s.learned] = &step_session(s.learned, p.memory, labels.guided);
      updates[s.learned] = std::make_unique<Ort::IoBinding>(*step_sessions[s.learned]);
      updates[s.learned]->BindInput("out", out);
      if (labels.guided) updates[s.learned]->BindInput("scale", scale_v);
    }
  net.BindOutput("model_output", out);
  if (info_.num_classes) net.BindInput("y", y_v);
  if (draw_x_T) rng.fill_normal(x_T.data(), b * chw);
  else std::copy(x_out, x_out + b * chw, x_T.begin());
  if (labels.guided) std::copy(x_T.begin(), x_T.begin() + b * chw, x_T.begin() + b * chw);  // [x_T; x_T]
  const Ort::Value* x = &xT_v;
  const Ort::Value* pair = &xpair_v;
  const Ort::Value* bad = &bad_start_v;
  const Ort::Value* z_bound[2] = {nullptr, nullptr};  // zeros are bound once; z after every draw
  double network_s = 0.0;
  const size_t S = p.steps.size();
  for (size_t k = 0; k < S; ++k) {
    const Step& s = p.steps[k];
    std::fill(t.begin(), t.end(), s.t);
    std::future<void> drawn = s.add_noise ? draw_noise(rng, z.data(), b * chw, spare_core_) : std::future<void>();
    const auto r0 = std::chrono::steady_clock::now();
    net.BindInput("x", labels.guided ? *pair : *x);  // binding copies host tensors to the device: bind after every change
    net.BindInput("t", t_v);
    net.SynchronizeInputs();
    session_.Run(Ort::RunOptions{nullptr}, net);
    network_s += seconds_since(r0);
    const float lim = p.clip ? 1.0f : INFINITY;
    const float row[11] = {float(s.x0_x), float(s.x0_o), float(s.mean_x0), float(s.mean_xt), float(s.sigma),
                           float(s.log_var_min), float(s.log_var_max), -lim, lim, 1.0f, 0.5f};
    std::copy(row, row + 11, c.begin());  // c_v views c: write in place
    for (int64_t j = 0; j < p.memory; ++j) c[11 + j] = float(s.mean_x0_prev[j]);
    if (drawn.valid()) drawn.get();
    Ort::IoBinding& update = *updates[s.learned];
    if (s.add_noise || z_bound[s.learned] != &zeros_v) update.BindInput("z", s.add_noise ? z_v : zeros_v);
    z_bound[s.learned] = s.add_noise ? &z_v : &zeros_v;
    for (int64_t j = 1; j <= p.memory; ++j)
      update.BindInput(("x0_" + std::to_string(j)).c_str(), int64_t(k) >= j ? x0s[(int64_t(k) - j) % ring] : zeros_v);
    if (p.memory) update.BindOutput("x0", x0s[k % ring]);
    Ort::Value& next = k + 1 == S ? result_v : device_x[k % 2];
    Ort::Value& bad_next = k + 1 == S ? bad_end_v : device_bad[k % 2];
    update.BindInput("x", *x);
    update.BindInput("c", c_v);
    update.BindInput("bad", *bad);
    update.BindOutput("x_next", next);
    update.BindOutput("bad_next", bad_next);
    if (labels.guided) update.BindOutput("x_pair", device_pair[k % 2]);
    update.SynchronizeInputs();
    step_sessions[s.learned]->Run(Ort::RunOptions{nullptr}, update);
    x = &next;
    bad = &bad_next;
    if (labels.guided) pair = &device_pair[k % 2];
    tick(k + 1);
  }
  for (auto& update : updates)
    if (update) update->SynchronizeOutputs();
  need_finite_output(S == 0 || bad_end == 0.0f, "at some row of this batch");
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
