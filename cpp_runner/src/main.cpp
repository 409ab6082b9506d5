// ddpm_runner: sample images from an exported DDPM eps_theta ONNX file, with the options, defaults and output
// formats of `ddpm onnx-sample`.
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "ddpm/sampler.h"
#include "mt19937.h"
#include "parse.h"

namespace {

using ddpm::Error;

const char* kUsage =
    "usage: ddpm_runner --model FILE.onnx [--out FILE.png|FILE.npz|FILE.npy] [options]\n"
    "Samples images from an eps_theta ONNX file written by `ddpm export`: for the same model, seed, batch size and\n"
    "options, the images of `ddpm onnx-sample`. Options (default):\n"
    "  --model FILE.onnx            the model (required)\n"
    "  --out FILE                   .png: a grid; .npz: arr_0 uint8 [N, H, W, C] and, for a class-conditional model,\n"
    "                               arr_1 int64 labels [N]; .npy: float32 [N, C, H, W] (samples.png)\n"
    "  --num-samples N              images to sample, 1..16777216 (64)\n"
    "  --batch-size B               images per network call, 1..16777216 (256)\n"
    "  --sampler NAME               ancestral|ddim|dpmpp2m|dpmpp2m-sde|dpmpp3m|unipc (the model's own, with its\n"
    "                               steps and spacing: ancestral, or a distilled student's ddim)\n"
    "  --steps S                    network calls, 1..T (T for ancestral, min(50, T) for the others; a student's own)\n"
    "  --eta E                      DDIM's eta in [0, 1], ddim only (0)\n"
    "  --spacing NAME               uniform|linspace|trailing|quadratic|logsnr: the kept timesteps (trailing\n"
    "                               for a zero-terminal-SNR schedule, else uniform)\n"
    "  --corrector-steps K          Langevin corrector rows per timestep, 0..1000; ancestral, ddim (0)\n"
    "  --snr R                      the corrector's signal-to-noise ratio, > 0 (0.16)\n"
    "  --clip | --no-clip           clip the predicted x0 to [-1, 1] (the model's ddpm.clip_denoised)\n"
    "  --seed S                     numpy RandomState seed, 0..4294967295 (0)\n"
    "  --provider NAME              auto|cpu|cuda; auto: CUDA if it can be used, else the CPU (auto)\n"
    "  --threads K                  ONNX Runtime's intra-op threads, 0..1024; 0: its default, a thread per core (0)\n"
    "  --engine NAME                onnxruntime|openvino: what runs the network; openvino: the CPU, a library built\n"
    "                               with -DDDPM_WITH_OPENVINO=ON (onnxruntime)\n"
    "  --precision NAME             auto|fp32|bf16: how the network computes; auto: the file's own precision under\n"
    "                               onnxruntime, bf16 under openvino where the CPU has AVX512-BF16 or AMX (auto)\n"
    "  --json                       a JSON summary on stdout (off)\n"
    "  --init FILE.npy              start from its float32 [N, C, H, W] instead of drawing x_T, e.g. latents to\n"
    "                               decode; N replaces --num-samples (none)\n"
    "  --invert                     with --init: encode those images by DDIM inversion over --steps and --spacing,\n"
    "                               into latents (write a .npy) (off)\n"
    "  --class K | --classes K1,K2  the classes (indices or names) of a class-conditional model, in equal blocks,\n"
    "                               a grid row each (every class)\n"
    "  --guidance S                 classifier-free guidance out_u + S (out_c - out_u): 1 conditional, 0 unconditional (1)\n"
    "  --help                       this text\n"
    "Testing aids: --dump-noise COUNT (the seed's first COUNT float64 normals), --dump-plan (the plan as JSON),\n"
    "--step-graph (the CUDA path's row updates as ONNX graphs, on any provider).\n"
    "A user's error prints one line and exits with status 2.\n";

struct Args {
  std::string model, out = "samples.png", init;
  std::optional<std::string> classes;
  std::optional<double> guidance;  // none: ddpm::kDefaultGuidance
  ddpm::PlanOptions plan;
  ddpm::Provider provider = ddpm::Provider::Auto;
  ddpm::Engine engine = ddpm::Engine::OnnxRuntime;
  ddpm::Precision precision = ddpm::Precision::Auto;
  int64_t num_samples = 64, batch_size = 256, threads = 0, dump_noise = -1, seed = 0;
  bool json = false, help = false, dump_plan = false, step_graph = false, invert = false, num_samples_given = false;
};

int64_t int_in(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  const int64_t x = ddpm::parse_int(v, flag);
  if (x < lo || x > hi) throw Error(flag + " must be in " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + v);
  return x;
}

// A finite number that `ok` accepts (`range` says which, for the message).
double real_in(const std::string& flag, const std::string& v, bool ok(double), const char* range) {
  const double x = ddpm::parse_double(v, flag);  // NaN and inf: an Error naming the flag
  if (!ok(x)) throw Error(flag + " must be " + range + ", got " + v);
  return x;
}

// A name parsed by the library, its Error prefixed with the flag.
template <typename Parse>
auto named(const std::string& flag, Parse parse) {
  try {
    return parse();
  } catch (const Error& e) {
    throw Error(flag + ": " + e.what());
  }
}

Args parse_args(int argc, char** argv) {
  static const std::set<std::string> switches = {"--clip", "--no-clip", "--json", "--dump-plan", "--step-graph",
                                                 "--invert", "--help", "-h"};
  static const std::set<std::string> valued = {
      "--model", "--out", "--num-samples", "--batch-size", "--sampler", "--steps", "--eta", "--spacing",
      "--corrector-steps", "--snr", "--seed", "--provider", "--threads", "--engine", "--precision", "--init", "--class",
      "--classes", "--guidance", "--dump-noise"};
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i], v;
    if (switches.count(f) == 0 && valued.count(f) == 0)
      throw Error("unknown option '" + ddpm::printable(f) + "' (see --help)");
    if (valued.count(f)) {
      if (i + 1 >= argc) throw Error(f + " needs a value");
      v = argv[++i];
    }
    if (f == "--model") a.model = v;
    else if (f == "--out") a.out = v;
    else if (f == "--num-samples") a.num_samples = int_in(f, v, 1, 1 << 24), a.num_samples_given = true;
    else if (f == "--batch-size") a.batch_size = int_in(f, v, 1, 1 << 24);
    else if (f == "--sampler") a.plan.sampler = named(f, [&] { return ddpm::parse_sampler(v); });
    else if (f == "--steps") a.plan.steps = int_in(f, v, 1, 1 << 24);
    else if (f == "--eta") a.plan.eta = real_in(f, v, [](double x) { return x >= 0 && x <= 1; }, "in [0, 1]");
    else if (f == "--spacing") a.plan.spacing = named(f, [&] { return ddpm::parse_spacing(v); });
    else if (f == "--corrector-steps") a.plan.corrector_steps = int_in(f, v, 0, 1000);
    else if (f == "--snr") a.plan.snr = real_in(f, v, [](double x) { return x > 0; }, "> 0");
    else if (f == "--clip" || f == "--no-clip") a.plan.clip = f == "--clip";
    else if (f == "--seed") a.seed = int_in(f, v, 0, 4294967295LL);  // numpy's RandomState seed range
    else if (f == "--provider") a.provider = named(f, [&] { return ddpm::parse_provider(v); });
    else if (f == "--threads") a.threads = int_in(f, v, 0, 1024);
    else if (f == "--engine") a.engine = named(f, [&] { return ddpm::parse_engine(v); });
    else if (f == "--precision") a.precision = named(f, [&] { return ddpm::parse_precision(v); });
    else if (f == "--json") a.json = true;
    else if (f == "--init") a.init = v;
    else if (f == "--invert") a.invert = true;
    else if (f == "--class" || f == "--classes") a.classes = v;
    else if (f == "--guidance") a.guidance = ddpm::parse_double(v, f);
    else if (f == "--dump-noise") a.dump_noise = int_in(f, v, 0, 1 << 30);  // testing aid
    else if (f == "--dump-plan") a.dump_plan = true;                        // testing aid
    else if (f == "--step-graph") a.step_graph = true;  // the CUDA path's update, on the CPU: testing aid
    else a.help = true;
  }
  if (a.help || a.dump_noise >= 0) return a;
  if (a.model.empty()) throw Error("--model is required (see --help)");
  if (a.invert && a.init.empty()) throw Error("--invert encodes images: give them with --init FILE.npy");
  return a;
}

// The checks of --out that can be made before sampling: its format, and a folder to write it into.
void check_writable(const std::string& out) {
  std::string lower = out;
  for (char& c : lower) c = char(std::tolower(uint8_t(c)));
  const auto ends_with = [&](const std::string& suffix) {
    return lower.size() >= suffix.size() && lower.compare(lower.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (!ends_with(".png") && !ends_with(".npz") && !ends_with(".npy"))
    throw Error("--out must end in .png, .npz or .npy: " + out);
  std::filesystem::path dir = std::filesystem::path(out).parent_path();
  if (dir.empty()) dir = ".";
  if (!std::filesystem::is_directory(dir) || access(dir.c_str(), W_OK) != 0)
    throw Error("cannot write " + out + ": " + dir.string() + " is not a writable folder");
}

// float32 [N, C, H, W] from a .npy (format 1.0-3.0, '<f4', C order) whose image shape is the model's.
std::vector<float> read_npy(const std::string& path, const ddpm::ModelInfo& m, int64_t* n) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  char magic[8] = {};
  if (!f.read(magic, 8) || std::string(magic, 6) != "\x93NUMPY" || magic[6] < 1 || magic[6] > 3)
    throw Error(path + ": not a .npy file");
  uint32_t len = 0;
  unsigned char bytes[4] = {};
  f.read(reinterpret_cast<char*>(bytes), magic[6] == 1 ? 2 : 4);
  for (int i = (magic[6] == 1 ? 1 : 3); i >= 0; --i) len = len << 8 | bytes[i];
  std::string header(len < (1u << 16) ? len : 0, ' ');
  if (!f || header.empty() || !f.read(&header[0], std::streamsize(header.size())))
    throw Error(path + ": truncated .npy header");
  const auto has = [&](const char* what) { return header.find(what) != std::string::npos; };
  const size_t open = header.find("'shape': (");
  if (!has("'descr': '<f4'") || !has("'fortran_order': False") || open == std::string::npos)
    throw Error(path + ": --init needs float32 ('<f4') C-order data");
  const std::string shape = header.substr(open + 10, header.find(')', open) - open - 10);
  std::vector<int64_t> dims;
  std::stringstream ss(shape);
  for (std::string d; std::getline(ss, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) dims.push_back(ddpm::parse_int(d.substr(d.find_first_not_of(' ')), path));
  if (dims.size() != 4 || dims[1] != m.C || dims[2] != m.H || dims[3] != m.W || dims[0] < 1 || dims[0] > (1 << 24))
    throw Error(path + ": --init needs [N, " + std::to_string(m.C) + ", " + std::to_string(m.H) + ", " +
                     std::to_string(m.W) + "], got (" + shape + ")");
  const uint64_t count = uint64_t(dims[0]) * uint64_t(m.image_floats());
  const std::streamoff data_at = f.tellg();
  f.seekg(0, std::ios::end);
  // The header's shape is checked against the file's size before it sizes an allocation.
  if (!f || uint64_t(f.tellg() - data_at) < count * sizeof(float)) throw Error(path + ": truncated .npy data");
  f.seekg(data_at);
  std::vector<float> x(count);
  if (!f.read(reinterpret_cast<char*>(x.data()), std::streamsize(x.size() * sizeof(float))))
    throw Error(path + ": truncated .npy data");
  *n = dims[0];
  return x;
}

// A class given by name (one of the model's class names) or index, as `ddpm onnx-sample` takes it.
int64_t class_index(const ddpm::ModelInfo& m, const std::string& given) {
  const size_t first = given.find_first_not_of(" \t\n\r\f\v"), last = given.find_last_not_of(" \t\n\r\f\v");
  const std::string k = first == std::string::npos ? "" : given.substr(first, last - first + 1);
  const auto it = std::find(m.class_names.begin(), m.class_names.end(), k);
  if (it != m.class_names.end()) return it - m.class_names.begin();
  int64_t index = -1;
  const auto parsed = std::from_chars(k.data(), k.data() + k.size(), index);
  if (!k.empty() && parsed.ec == std::errc() && parsed.ptr == k.data() + k.size() && index >= 0 && index < m.num_classes)
    return index;
  std::string names;
  for (size_t i = 0; i < m.class_names.size() && names.size() <= 200; ++i) names += (i ? ", " : "") + m.class_names[i];
  throw Error("--class " + ddpm::printable(k) + ": not a class of this model (" +
              (names.empty() ? "" : ddpm::printable(names, 200) + "; or ") + "0.." + std::to_string(m.num_classes - 1) + ")");
}

// The labels of n images: the classes asked for (every class of a conditional model by default) in equal blocks,
// classes[i / ceil(n / len(classes))], as export/onnx_sampler.balanced_labels; none for an unconditional model.
ddpm::Conditioning conditioning(const Args& a, const ddpm::ModelInfo& m, int64_t n) {
  ddpm::Conditioning c;
  c.guidance = a.guidance;
  if (!m.num_classes) {
    if (a.classes || a.guidance)
      throw Error("--class/--guidance need a class-conditional model (this one is unconditional)");
    return c;
  }
  std::vector<int64_t> classes;
  if (a.classes)
    for (const std::string& k : ddpm::split(*a.classes)) classes.push_back(class_index(m, k));
  else
    for (int64_t k = 0; k < m.num_classes; ++k) classes.push_back(k);
  const int64_t per = (n + int64_t(classes.size()) - 1) / int64_t(classes.size());
  for (int64_t i = 0; i < n; ++i) c.labels.push_back(classes[i / per]);
  return c;
}

// Testing aid: the plan as JSON, float64 values printed so that they round-trip exactly.
void dump_plan(const ddpm::Plan& p) {
  const auto column = [&](const char* name, auto field) {
    std::printf("\"%s\": [", name);
    for (size_t k = 0; k < p.steps.size(); ++k) std::printf(k ? ", %.17g" : "%.17g", double(p.steps[k].*field));
    std::printf("], ");
  };
  std::printf("{");
  column("t", &ddpm::Step::t), column("x0_x", &ddpm::Step::x0_x), column("x0_o", &ddpm::Step::x0_o);
  column("mean_x0", &ddpm::Step::mean_x0), column("mean_xt", &ddpm::Step::mean_xt), column("sigma", &ddpm::Step::sigma);
  column("log_var_min", &ddpm::Step::log_var_min), column("log_var_max", &ddpm::Step::log_var_max);
  column("add_noise", &ddpm::Step::add_noise), column("learned", &ddpm::Step::learned);
  std::printf("\"mean_x0_prev\": [");
  for (size_t k = 0; k < p.steps.size(); ++k) {
    std::printf(k ? ", [" : "[");
    for (size_t j = 0; j < p.steps[k].mean_x0_prev.size(); ++j) std::printf(j ? ", %.17g" : "%.17g", p.steps[k].mean_x0_prev[j]);
    std::printf("]");
  }
  std::printf("], \"clip\": %d, \"channels\": %lld, \"memory\": %lld}\n", p.clip, (long long)p.channels,
              (long long)p.memory);
}

int run(int argc, char** argv) {
  const Args a = parse_args(argc, argv);
  if (a.help) return std::fputs(kUsage, stdout), 0;
  if (a.dump_noise >= 0) {  // RandomState(seed).standard_normal(count), float64
    ddpm::RandomState rng(uint32_t(a.seed));
    for (int64_t i = 0; i < a.dump_noise; ++i) std::printf("%.17g\n", rng.standard_normal());
    return 0;
  }
  if (!a.dump_plan) check_writable(a.out);
  const auto t0 = std::chrono::steady_clock::now();
  ddpm::LoadOptions load;
  load.provider = a.provider, load.step_graph = a.step_graph, load.engine = a.engine, load.precision = a.precision;
  if (a.threads) load.threads = int(a.threads);
  ddpm::Sampler sampler(a.model, load);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const ddpm::Plan plan = a.invert ? ddpm::make_inversion_plan(sampler.info(), a.plan.steps, a.plan.spacing)
                                   : ddpm::make_plan(sampler.info(), a.plan);
  if (a.dump_plan) return dump_plan(plan), 0;
  int64_t n = a.num_samples;
  const std::vector<float> init = a.init.empty() ? std::vector<float>() : read_npy(a.init, sampler.info(), &n);
  if (!a.init.empty() && a.num_samples_given && n != a.num_samples)
    throw Error("--num-samples " + std::to_string(a.num_samples) + " but " + a.init + " holds " + std::to_string(n) + " images");

  const bool tty = isatty(STDERR_FILENO);  // on a terminal every step, in a log once per batch
  const auto progress = [tty](int64_t b, int64_t nb, int64_t k, int64_t s) {
    if (!tty && k != s) return;
    std::fprintf(stderr, "%sbatch %lld/%lld step %lld/%lld", tty ? "\r" : "", (long long)b + 1, (long long)nb,
                 (long long)k, (long long)s);
    if (!tty || (b + 1 == nb && k == s)) std::fputc('\n', stderr);
  };
  const int64_t batch = std::min(a.batch_size, n);
  std::vector<float> x(size_t(n) * sampler.image_floats());
  ddpm::SampleOptions options;
  options.batch = batch, options.init = init.empty() ? nullptr : init.data();
  options.conditioning = conditioning(a, sampler.info(), n), options.progress = progress;
  const ddpm::RunStats st = sampler.sample(plan, uint32_t(a.seed), x.data(), x.size(), options);
  ddpm::save_images(a.out, x.data(), x.size(), sampler.info(), options.conditioning.labels);
  const double overhead = st.total_s - st.network_s, ips = double(n) / std::max(st.total_s, 1e-9);
  std::fprintf(stderr, "%s: %lld images x %zu steps in %.3f s (%.2f images/s); Session::Run %.3f s, "
               "loop overhead %.4f s (%.2f%%); wrote %s\n", sampler.provider().c_str(), (long long)n,
               plan.steps.size(), st.total_s, ips, st.network_s, overhead, 100.0 * overhead / st.total_s, a.out.c_str());
  if (a.json)
    std::printf("{\"provider\": \"%s\", \"num_samples\": %lld, \"batch_size\": %lld, \"sampler\": \"%s\", \"steps\": %zu, "
                "\"load_s\": %.6f, \"total_s\": %.6f, \"network_s\": %.6f, \"overhead_s\": %.6f, \"images_per_s\": %.4f}\n",
                sampler.provider().c_str(), (long long)n, (long long)batch, ddpm::to_string(*ddpm::model_options(sampler.info(), a.plan).sampler).c_str(),
                plan.steps.size(), load_s, st.total_s, st.network_s, overhead, ips);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // ddpm::Error: one line; anything else is a bug, also reported in one line
    std::fprintf(stderr, "ddpm_runner: error: %s\n", e.what());
  }
  return 2;
}
