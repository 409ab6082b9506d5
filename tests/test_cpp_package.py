"""The C++ library as an app embeds it: `cmake --install` gives a self-contained, relocatable prefix (ONNX Runtime
copied into it, every RUNPATH $ORIGIN-relative) with a CMake package that an app finds with
find_package(ddpm_runner CONFIG) and links as ddpm_runner::sampler. The prefix is moved after installing, and
everything here uses it there: docs/cpp.md's embedding example, built against the moved prefix, and the installed
ddpm_runner run without LD_LIBRARY_PATH, load ONNX Runtime from inside the moved prefix (also with the wheel that
the build used hidden) and give the right samples."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import RUNNER_DIR
from small_models import python_reference

ROOT = Path(__file__).resolve().parents[1]


def readme_block(language: str) -> str:
    """The first ```language block of docs/cpp.md (the C++ page the README links to)."""
    return re.search(rf"```{language}\n(.*?)```", (ROOT / "docs" / "cpp.md").read_text(), re.S).group(1)


def without_library_path(**extra) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}, **extra}


def sh(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def inside(path: str | Path, folder: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(folder)


def build_machine_runtime() -> Path:
    """The folder of the libonnxruntime.so.1.x the build linked (the onnxruntime wheel's capi/)."""
    return Path(os.path.realpath(RUNNER_DIR / "build" / "ort_lib" / "libonnxruntime.so.1")).parent


@pytest.fixture(scope="module")
def prefix(runner, tmp_path_factory) -> Path:
    """Installed into one folder, then moved to another: the prefix every test below uses."""
    installed = tmp_path_factory.mktemp("install") / "prefix"
    sh("cmake", "--install", RUNNER_DIR / "build", "--prefix", installed)
    moved = tmp_path_factory.mktemp("moved") / "elsewhere" / "ddpm"
    moved.parent.mkdir()
    shutil.move(installed, moved)
    assert not installed.exists()
    yield moved
    shutil.rmtree(moved, ignore_errors=True)  # ~300 MB with the CUDA provider


def test_install_tree_has_library_header_package_and_command(prefix):
    for path in ["include/ddpm/sampler.h", "lib/cmake/ddpm_runner/ddpm_runnerConfig.cmake",
                 "lib/cmake/ddpm_runner/ddpm_runnerConfigVersion.cmake", "bin/ddpm_runner"]:
        assert (prefix / path).is_file(), path
    assert list((prefix / "lib").glob("libddpm_sampler.so*"))
    # ONNX Runtime stays private: not in the public header, nor in what the package asks of a consumer.
    assert "#include <onnxruntime" not in (prefix / "include/ddpm/sampler.h").read_text()
    targets = "".join(p.read_text() for p in (prefix / "lib/cmake/ddpm_runner").glob("ddpm_runnerTargets*.cmake"))
    assert "ddpm_runner::sampler" in targets
    assert "ORT_API_MANUAL_INIT" not in targets and "onnxruntime" not in targets.lower()


def test_prefix_holds_copies_of_onnx_runtime_and_only_origin_relative_runpaths(prefix):
    ort = prefix / "lib" / "ddpm_runner"
    runtime = build_machine_runtime()
    real = ort / os.readlink(ort / "libonnxruntime.so.1")  # the SONAME: a link to the copied file beside it
    assert real.parent == ort and real.is_file() and not real.is_symlink()
    assert real.read_bytes() == (runtime / real.name).read_bytes()
    wanted = ["libonnxruntime_providers_shared.so"]
    cache = (RUNNER_DIR / "build" / "CMakeCache.txt").read_text()
    if (runtime / "libonnxruntime_providers_cuda.so").exists() and "DDPM_CUDA:BOOL=ON" in cache:
        wanted.append("libonnxruntime_providers_cuda.so")  # the runtime is a CUDA build, and the build is for CUDA
    for name in wanted:
        assert (ort / name).is_file() and not (ort / name).is_symlink(), name
    elves = []
    for path in sorted(prefix.rglob("*")):
        if path.is_symlink():  # relative, and resolving to a file in the prefix
            assert not os.path.isabs(os.readlink(path)), path
            assert path.resolve().is_file() and inside(path.resolve(), prefix), path
        elif path.is_file() and path.open("rb").read(4) == b"\x7fELF":
            elves.append(path)
        if path.is_file() and "onnxruntime" not in path.name:  # ours (ONNX Runtime's files are checked above)
            assert str(ROOT).encode() not in path.read_bytes(), f"{path} names the build machine's {ROOT}"
    assert {p.name for p in elves} >= {"ddpm_runner", real.name, *wanted}
    for elf in elves:
        dynamic = sh("readelf", "-d", elf).stdout
        for entry in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dynamic):
            for folder in entry.split(":"):
                assert folder.startswith("$ORIGIN"), (elf, entry)
                assert inside(folder.replace("$ORIGIN", str(elf.parent)), prefix), (elf, entry)


def loaded_libraries(ld_debug: str) -> list[str]:
    """The libraries whose initialisers ran, from LD_DEBUG=libs output."""
    return [os.path.normpath(p) for p in re.findall(r"calling init: (\S+)", ld_debug)]


def assert_runs_from(prefix: Path, stderr: str) -> None:
    ours = [p for p in loaded_libraries(stderr) if "onnxruntime" in p or "ddpm_sampler" in p]
    assert any("libonnxruntime.so" in p for p in ours) and any("libddpm_sampler.so" in p for p in ours), stderr[-3000:]
    for path in ours:
        assert inside(path, prefix), f"{path} was loaded from outside the moved prefix {prefix}"


def test_moved_command_loads_onnx_runtime_from_the_prefix_and_samples_right(prefix, models, tmp_path):
    args = ["--num-samples", 5, "--batch-size", 2, "--sampler", "ddim", "--steps", 4, "--seed", 7]
    proc = sh(prefix / "bin/ddpm_runner", "--model", models["eps_small"], *args, "--out", tmp_path / "x.npy",
              env=without_library_path(LD_DEBUG="libs"))
    assert_runs_from(prefix, proc.stderr)
    _, want = python_reference(models["eps_small"], n=5, batch=2, sampler="ddim", steps=4, seed=7)
    assert np.abs(np.load(tmp_path / "x.npy") - want).max() <= 1e-3


@pytest.fixture(scope="module")
def example_app(prefix, tmp_path_factory) -> Path:
    """docs/cpp.md's CMakeLists.txt and C++ example, built against the moved prefix's package."""
    app = tmp_path_factory.mktemp("app")
    (app / "CMakeLists.txt").write_text(readme_block("cmake"))
    code = readme_block("cpp")
    assert len(code.strip().splitlines()) <= 15  # docs/cpp.md promises a 15-line example
    (app / "app.cpp").write_text(code)
    # -Werror: the public header is clean under a consumer's warnings too.
    sh("cmake", "-S", app, "-B", app / "build", f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release",
       "-DCMAKE_CXX_FLAGS=-Wall -Wextra -Werror")
    sh("cmake", "--build", app / "build")
    flags = "".join(p.read_text() for p in (app / "build/CMakeFiles").glob("*.dir/flags.make"))
    assert "ORT_API_MANUAL_INIT" not in flags and "onnxruntime" not in flags
    return next(p for p in (app / "build").iterdir() if p.is_file() and os.access(p, os.X_OK))


def test_readme_embedding_example_matches_the_command(example_app, prefix, models, tmp_path):
    """The example writes samples.npz with ddpm::save_images; the installed command, the same arrays."""
    from ddpm_reference.export.onnx_sampler import to_uint8
    proc = sh(example_app, models["eps_small"], cwd=tmp_path, env=without_library_path(LD_DEBUG="libs"))
    assert_runs_from(prefix, proc.stderr)
    got = np.load(tmp_path / "samples.npz")
    assert got.files == ["arr_0"] and got["arr_0"].dtype == np.uint8 and got["arr_0"].shape == (4, 8, 8, 1)
    command = [prefix / "bin/ddpm_runner", "--model", models["eps_small"], "--num-samples", 4, "--sampler", "ddim",
               "--steps", 20, "--seed", 0]
    sh(*command, "--out", tmp_path / "want.npz", env=without_library_path())
    sh(*command, "--out", tmp_path / "want.npy", env=without_library_path())
    np.testing.assert_array_equal(got["arr_0"], np.load(tmp_path / "want.npz")["arr_0"])  # the same library
    np.testing.assert_array_equal(got["arr_0"], to_uint8(np.load(tmp_path / "want.npy")).transpose(0, 2, 3, 1))


def test_readme_example_catches_a_bad_file_as_the_library_error(example_app, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    proc = subprocess.run([str(example_app), str(tmp_path / "junk.onnx")], capture_output=True, text=True,
                          env=without_library_path(), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot load" in lines[0], proc.stderr


def test_moved_prefix_runs_with_the_build_machines_runtime_hidden(example_app, prefix, models, tmp_path):
    """In a mount namespace where empty folders lie over the onnxruntime wheel's capi/ (what the build linked) and
    the build tree's ort_lib/, the app and the command still run, from the prefix alone."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("unshare -m is not permitted here (it needs root or CAP_SYS_ADMIN): the venv cannot be hidden")
    empty = tmp_path / "empty"
    empty.mkdir()
    hidden = [f for f in (build_machine_runtime(), RUNNER_DIR / "build" / "ort_lib") if f.is_dir()]
    mounts = " && ".join(f"mount --bind '{empty}' '{folder}'" for folder in hidden)
    probe = f"test -z \"$(ls -A '{hidden[0]}')\""  # the wheel's folder really looks empty in there

    def hidden_run(*args, cwd=None):
        return sh("unshare", "-m", "sh", "-c", f'{mounts} && {probe} && exec "$@"', "sh", *args, cwd=cwd,
                  env=without_library_path(LD_DEBUG="libs"))

    (tmp_path / "app").mkdir()
    assert_runs_from(prefix, hidden_run(example_app, models["eps_small"], cwd=tmp_path / "app").stderr)
    proc = hidden_run(prefix / "bin/ddpm_runner", "--model", models["eps_small"], "--num-samples", 4, "--sampler",
                      "ddim", "--steps", 20, "--seed", 0, "--out", tmp_path / "x.npz")
    assert_runs_from(prefix, proc.stderr)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npz")["arr_0"], np.load(tmp_path / "app/samples.npz")["arr_0"])
    _, want = python_reference(models["eps_small"], n=4, batch=4, sampler="ddim", steps=20, seed=0)
    from ddpm_reference.export.onnx_sampler import to_uint8
    assert np.abs(np.load(tmp_path / "x.npz")["arr_0"].astype(int) - to_uint8(want).transpose(0, 2, 3, 1)).max() <= 1


API_CHECKS = r"""
#include <ddpm/sampler.h>
#include <cmath>
#include <cstdio>
#include <functional>
#include <vector>
// The library's own checks, for a user with no command line in front of it: one line per case, "name<TAB>ok" or
// "name<TAB>error<TAB>message". argv: MODEL.onnx IN.f32 OUT.u8 (to_uint8 of IN's floats).
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  ddpm::LoadOptions cpu;
  cpu.provider = ddpm::Provider::Cpu;
  const ddpm::Sampler sampler(argv[1], cpu);
  const auto check = [](const char* name, const std::function<void()>& f) {
    try {
      f();
      std::printf("%s\tok\n", name);
    } catch (const ddpm::Error& e) {
      std::printf("%s\terror\t%s\n", name, e.what());
    }
  };
  const auto plan = [&](const std::function<void(ddpm::PlanOptions&)>& change) {
    return [&, change] { ddpm::PlanOptions o; change(o); ddpm::make_plan(sampler.info(), o); };
  };
  using O = ddpm::PlanOptions&;
  const double nan = std::nan(""), inf = INFINITY;
  check("defaults", plan([](O) {}));
  check("ddim eta 1", plan([](O o) { o.sampler = ddpm::SamplerKind::Ddim, o.eta = 1; }));
  for (double eta : {nan, inf, -inf, -0.5, 2.0})
    check("eta", plan([=](O o) { o.sampler = ddpm::SamplerKind::Ddim, o.eta = eta; }));
  for (double snr : {nan, inf, 0.0, -1.0}) check("snr", plan([=](O o) { o.corrector_steps = 1, o.snr = snr; }));
  for (int64_t k : {-1, 1001}) check("corrector_steps", plan([=](O o) { o.corrector_steps = k; }));
  for (int64_t s : {0, -1, 201}) check("steps", plan([=](O o) { o.steps = s; }));
  check("sampler", plan([](O o) { o.sampler = ddpm::SamplerKind(7); }));
  check("spacing", plan([](O o) { o.spacing = ddpm::Spacing(-1); }));
  check("inversion steps", [&] { ddpm::make_inversion_plan(sampler.info(), 0); });
  for (int threads : {0, -1, 1025})
    check("threads", [&] { ddpm::LoadOptions o; o.threads = threads; ddpm::Sampler(argv[1], o); });
  check("provider", [&] { ddpm::LoadOptions o; o.provider = ddpm::Provider(9); ddpm::Sampler(argv[1], o); });
  check("parse", [] { ddpm::parse_sampler("DDIM"); });
  check("names", [] {
    for (const char* s : {"ancestral", "ddim", "dpmpp2m", "dpmpp2m-sde", "dpmpp3m", "unipc"})
      if (ddpm::to_string(ddpm::parse_sampler(s)) != s) throw ddpm::Error(s);
    for (const char* s : {"uniform", "linspace", "trailing", "quadratic", "logsnr"})
      if (ddpm::to_string(ddpm::parse_spacing(s)) != s) throw ddpm::Error(s);
    for (const char* s : {"auto", "cpu", "cuda"})
      if (ddpm::to_string(ddpm::parse_provider(s)) != s) throw ddpm::Error(s);
  });
  std::vector<float> x(2 * sampler.image_floats(), 0.25f);
  check("batch", [&] {
    ddpm::SampleOptions o;
    o.batch = 0;
    ddpm::Sampler(argv[1], cpu).sample(ddpm::make_plan(sampler.info(), {}), 0, x.data(), x.size(), o);
  });
  check("save jpg", [&] { ddpm::save_images("x.jpg", x.data(), x.size(), sampler.info()); });
  check("save partial image", [&] { ddpm::save_images("x.npz", x.data(), x.size() - 1, sampler.info()); });
  check("save labels", [&] { ddpm::save_images("x.npz", x.data(), x.size(), sampler.info(), {1}); });
  check("save no folder", [&] { ddpm::save_images("no/such/x.npz", x.data(), x.size(), sampler.info()); });
  std::FILE* in = std::fopen(argv[2], "rb");
  std::vector<float> v(1 << 20);
  v.resize(std::fread(v.data(), sizeof(float), v.size(), in));
  std::fclose(in);
  const std::vector<uint8_t> pixels = ddpm::to_uint8(v.data(), v.size());
  std::FILE* out = std::fopen(argv[3], "wb");
  std::fwrite(pixels.data(), 1, pixels.size(), out);
  std::fclose(out);
}
"""

API_EXPECTED = [("defaults", None), ("ddim eta 1", None)] + [("eta", "eta must be in [0, 1], got ")] * 5 + \
    [("snr", "snr must be a finite number > 0")] * 4 + \
    [("corrector_steps", "corrector steps must be in 0..1000")] * 2 + \
    [("steps", "steps must be in 1..200")] * 3 + [("sampler", "unknown sampler (enum value 7)"),
                                                  ("spacing", "unknown spacing (enum value"),
                                                  ("inversion steps", "steps must be in 1..200")] + \
    [("threads", "threads must be in 1..1024")] * 3 + [
    ("provider", "unknown provider (enum value 9)"),
    ("parse", "unknown sampler 'DDIM' (ancestral, ddim, dpmpp2m, dpmpp2m-sde, dpmpp3m or unipc)"), ("names", None),
    ("batch", "batch must be at least 1"), ("save jpg", "must end in .png, .npz or .npy"),
    ("save partial image", "save_images needs n >= 1 images of C*H*W = 64 floats"),
    ("save labels", "one label per image"), ("save no folder", "cannot write no/such/x.npz")]


def test_library_checks_its_options_and_makes_pythons_pixels(prefix, models, tmp_path):
    """A library user has no command line in front of it: make_plan, the Sampler, sample and save_images refuse
    options out of range (NaN and inf too) with a ddpm::Error; to_uint8 gives export/onnx_sampler.to_uint8's
    pixels, half to even, with NaN as 0."""
    from ddpm_reference.export.onnx_sampler import to_uint8
    app = tmp_path / "checks"
    app.mkdir()
    (app / "CMakeLists.txt").write_text(readme_block("cmake"))
    (app / "app.cpp").write_text(API_CHECKS)
    sh("cmake", "-S", app, "-B", app / "build", f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_CXX_FLAGS=-Wall -Werror")
    sh("cmake", "--build", app / "build")
    k = np.arange(256, dtype=np.float64)
    halves = ((k + 0.5) / 127.5 - 1).astype(np.float32)  # (v + 1) * 127.5 near k + 0.5: ties, or one ulp off
    values = np.concatenate([halves, np.nextafter(halves, np.float32(-2)), np.nextafter(halves, np.float32(2)),
                             np.random.RandomState(0).uniform(-1.5, 1.5, 10000).astype(np.float32),
                             np.array([-np.inf, np.inf, -1, 1, 0, -0.0, 3e38, -3e38], np.float32)])
    values.tofile(tmp_path / "in.f32")
    with open(tmp_path / "in.f32", "ab") as f:
        np.array([np.nan], np.float32).tofile(f)
    proc = sh(app / "build/app", models["eps_small"], tmp_path / "in.f32", tmp_path / "out.u8", cwd=tmp_path)
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert len(lines) == len(API_EXPECTED), proc.stdout
    for (name, status, *message), (want_name, want) in zip(lines, API_EXPECTED):
        assert name == want_name and (status == "ok" if want is None else status == "error" and want in message[0]), \
            (name, status, message, want)
    got = np.fromfile(tmp_path / "out.u8", dtype=np.uint8)
    np.testing.assert_array_equal(got[:-1], to_uint8(values))
    assert got[-1] == 0  # NaN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checks", "in.f32", "out.u8"]  # nothing written
