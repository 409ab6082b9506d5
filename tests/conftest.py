"""What the test files share: the in-process CLI runner, the built C++ runner, and the `slow` marker's rule."""
import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from hypothesis import settings  # noqa: E402

# Shared CPU machines make per-example timings noisy: hypothesis checks properties, not speed.
settings.register_profile("ddpm", deadline=None, max_examples=100)
settings.load_profile("ddpm")

ROOT = Path(__file__).resolve().parents[1]
RUNNER_DIR = ROOT / "cpp_runner"
# Tests that use these fixtures (directly or through another fixture) build the C++ runner, walk the README or run
# the page in Chromium; tests that train, compile or run `make demo` carry @pytest.mark.slow themselves. `make check`
# leaves both out.
SLOW_FIXTURES = {"runner", "walk", "browser"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains, compiles, builds the C++ runner or runs `make demo` (`make "
                                       "check` skips these; `make test` runs everything)")


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def cli(*args) -> CliResult:
    """`ddpm ARGS` in this process, as the entry point runs it (cli.main): (exit status, stdout, stderr). A bug
    raises here with its traceback, as it would in the command."""
    from ddpm_reference import cli as ddpm_cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ddpm_cli.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_user_error(res, *words):
    """One line on stderr, `ddpm: error: ...` with each of `words`, and exit status 2."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error:"), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="session")
def runner() -> Path:
    """cpp_runner/build/ddpm_runner, built once (cpp_runner/build.sh, linked against this interpreter's
    onnxruntime); skipped without cmake or a compiler, except under CI, where a failed build fails."""
    in_ci = bool(os.environ.get("CI"))
    tools = shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))
    if not tools and not in_ci and os.geteuid() != 0:
        pytest.skip("cmake or a C++ compiler is missing (apt-get install cmake g++ zlib1g-dev)")
    env = {**os.environ, "PYTHON": sys.executable}
    build = subprocess.run(["sh", str(RUNNER_DIR / "build.sh")], capture_output=True, text=True, env=env)
    if build.returncode != 0:
        tail = (build.stdout + build.stderr)[-3000:]
        if in_ci:
            pytest.fail(f"cpp_runner/build.sh failed:\n{tail}")
        pytest.skip(f"cpp_runner/build.sh failed (fatal when CI is set):\n{tail}")
    return RUNNER_DIR / "build" / "ddpm_runner"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    """Small ONNX models of every parameterisation and variance (small_models.py), by name."""
    pytest.importorskip("onnx")
    from small_models import make_models
    return make_models(tmp_path_factory.mktemp("models"))


def run_runner(runner: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    """The C++ runner with ARGS; with check, exit status 0 is asserted."""
    proc = subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="session")
def conditional_model(tmp_path_factory) -> Path:
    """A small class-conditional U-Net (3 classes, learned variances), exported by the project's exporter."""
    from ddpm_reference import ddpm, unet
    from ddpm_reference.export.onnx_export import export_onnx
    from small_models import IMAGE, T
    torch.manual_seed(3)
    net = unet.UNet(in_channels=1, out_channels=2, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.0, image_size=8, num_classes=3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("conditional") / "cond.onnx"
    export_onnx(net.eval(), ddpm.Diffusion(ddpm.beta_schedule("linear", T), "eps", "learned_range"), IMAGE, path,
                classes=["a", "b", "c"])
    return path


@pytest.fixture(scope="session")
def browser() -> str:
    """The Chromium of `ddpm web --headless`, with web/'s npm packages (`make web`); skipped where they are missing,
    except under CI, where that fails."""
    from ddpm_reference import web
    try:
        web.check_installed()
        return web.browser()
    except web.WebError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
