"""The C++ library as an app embeds it: `cmake --install` gives a CMake package that an app finds with
find_package(ddpm_runner CONFIG) and links as ddpm_runner::sampler; the README's embedding example, built that way,
runs without LD_LIBRARY_PATH and gives the same samples as the installed ddpm_runner command."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_cpp_runner import RUNNER_DIR, models, runner  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def readme_block(language: str) -> str:
    """The first ```language block of the README's "C++ runner" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## C++ runner\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def without_library_path() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}


def sh(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def prefix(runner, tmp_path_factory) -> Path:  # noqa: F811
    prefix = tmp_path_factory.mktemp("prefix")
    sh("cmake", "--install", RUNNER_DIR / "build", "--prefix", prefix)
    return prefix


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


def test_installed_command_runs_without_library_path(prefix, models, tmp_path):  # noqa: F811
    proc = subprocess.run([str(prefix / "bin/ddpm_runner"), "--model", str(models["eps_small"]), "--n", "2",
                           "--sampler", "ddim", "--steps", "3", "--out", str(tmp_path / "x.npy")],
                          capture_output=True, text=True, env=without_library_path(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "x.npy").shape == (2, 1, 8, 8)


@pytest.fixture(scope="module")
def example_app(prefix, tmp_path_factory) -> Path:
    """The README's CMakeLists.txt and C++ example, built against the installed package."""
    app = tmp_path_factory.mktemp("app")
    (app / "CMakeLists.txt").write_text(readme_block("cmake"))
    code = readme_block("cpp")
    assert len(code.strip().splitlines()) <= 15  # the README promises a 15-line example
    (app / "app.cpp").write_text(code)
    # -Werror: the public header is clean under a consumer's warnings too.
    sh("cmake", "-S", app, "-B", app / "build", f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release",
       "-DCMAKE_CXX_FLAGS=-Wall -Wextra -Werror")
    sh("cmake", "--build", app / "build")
    flags = "".join(p.read_text() for p in (app / "build/CMakeFiles").glob("*.dir/flags.make"))
    assert "ORT_API_MANUAL_INIT" not in flags and "onnxruntime" not in flags
    return next(p for p in (app / "build").iterdir() if p.is_file() and os.access(p, os.X_OK))


def test_readme_embedding_example_matches_the_command(example_app, prefix, models, tmp_path):  # noqa: F811
    sh(example_app, models["eps_small"], cwd=tmp_path, env=without_library_path())
    got = np.fromfile(tmp_path / "samples.f32", dtype=np.float32).reshape(4, 1, 8, 8)
    sh(prefix / "bin/ddpm_runner", "--model", models["eps_small"], "--n", 4, "--sampler", "ddim", "--steps", 20,
       "--seed", 0, "--out", tmp_path / "want.npy", env=without_library_path())
    np.testing.assert_array_equal(got, np.load(tmp_path / "want.npy"))  # the same library, bit for bit


def test_readme_example_catches_a_bad_file_as_the_library_error(example_app, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    proc = subprocess.run([str(example_app), str(tmp_path / "junk.onnx")], capture_output=True, text=True,
                          env=without_library_path(), timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot load" in lines[0], proc.stderr
