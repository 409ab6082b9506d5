// A file's metadata (read from the protobuf without ONNX Runtime, bounded, parsed strictly) and its graph
// checked against it; the names of the API's enums.
#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <type_traits>

#include "internal.h"

namespace ddpm {
namespace internal {

bool one_of(const std::string& v, std::initializer_list<const char*> allowed) {
  return std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return v == a; });
}

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
  m.default_options.sampler = SamplerKind::Ancestral, m.default_options.clip = m.clip_denoised;
  // The file's own plan (a distilled student's), each key checked as its option would be.
  const auto own = [&](const std::string& key, auto parse) {
    try {
      return parse(get(key));
    } catch (const Error& e) {
      throw Error(in + "bad ddpm." + key + ": " + e.what());
    }
  };
  if (has("sampler")) m.default_options.sampler = own("sampler", parse_sampler);
  if (has("spacing")) m.default_options.spacing = own("spacing", parse_spacing);
  if (has("steps")) {
    m.default_options.steps = parse_int(get("steps"), in + "ddpm.steps");
    need(*m.default_options.steps >= 1 && *m.default_options.steps <= T, in + "ddpm.steps must be in 1..T");
  }
  return m;  // other keys (ddpm.version, ddpm.data_range, ...) are not needed here and are ignored
}

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

}  // namespace internal

namespace {

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

}  // namespace ddpm
