"""The README and docs/ work as written: every code block runs (shell blocks with a small training budget, the
README's first, then each page's in DOCS order), `make demo` runs twice in a row, and the naming table of
docs/commands.md is what the commands and the C++ runner accept."""
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer

from ddpm_reference import cli
from ddpm_reference import data as datasets
from diffusers_models import save_stand_in

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ("commands.md", "precision.md", "cpp.md", "diffusers.md", "gpu.md", "internals.md")  # walked in this order
PAGES = [("README.md", README)] + [(f"docs/{name}", (ROOT / "docs" / name).read_text()) for name in DOCS]
RUNNER = ROOT / "cpp_runner" / "build" / "ddpm_runner"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
QUICK_START = "make demo", "make test"  # the quick start: test_make_demo_runs_twice, and CI's own `make test`
BUDGET = '''#!{python}
"""`ddpm` with a small training budget: optimizer steps / 40 (of each round for distill, whose first teacher takes 8
steps, and at most 2 steps of adversarial tuning), batches of at most 32, T = 100 for a new run."""
import os, sys
args = sys.argv[1:]
if args and args[0] in ("train", "train-classifier", "distill"):
    def scale(flag, default, f):
        if flag in args:
            i = args.index(flag) + 1
            args[i] = str(f(int(args[i])))
        else:
            args.extend([flag, str(default)])
    scale("--train-steps", 20, lambda n: max(2, n // 40))
    scale("--batch-size", 32, lambda b: min(b, 32))
    if args[0] == "distill":
        scale("--adversarial-steps", 2, lambda n: min(n, 2))
        if "--teacher-steps" not in args:
            args += ["--teacher-steps", "8"]  # three rounds: 4, 2, 1
    if args[0] != "distill" and "--resume" not in args and "--diffusion-steps" not in args:
        args += ["--diffusion-steps", "100"]
os.execv({ddpm!r}, [{ddpm!r}, *args])
'''


def blocks(text: str = README) -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block."""
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def every_block() -> list[tuple[str, str, str]]:
    """(language, code, "page, line N") of every fenced block of the README and docs/, in walking order."""
    return [(lang, code, f"{page}, line {line}") for page, text in PAGES for lang, code, line in blocks(text)]


def test_every_page_is_walked_and_the_readme_is_short():
    assert set(DOCS) == {p.name for p in (ROOT / "docs").glob("*.md")}
    assert len(README.splitlines()) <= 220


def test_every_block_is_of_a_kind_the_tests_run():
    kinds = {lang for lang, _, _ in every_block()}
    assert kinds <= {"sh", "python", "cmake", "cpp", "text"}, kinds  # cmake, cpp: tests/test_cpp_package.py
    assert "docs/cpp.md" in (ROOT / "tests" / "test_cpp_package.py").read_text()
    quick = [code for lang, code, _ in blocks() if lang == "sh" and code.lstrip().startswith("make")]
    assert len(quick) == 1 and [line.split("#")[0].strip() for line in quick[0].splitlines()] == list(QUICK_START)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """A user's folder after running the README's shell blocks in order (the tutorial's state)."""
    home = tmp_path_factory.mktemp("readme")
    (home / "bin").mkdir()
    shim = home / "bin" / "ddpm"
    shim.write_text(BUDGET.format(python=sys.executable, ddpm=str(Path(sys.executable).parent / "ddpm")))
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    (home / "cpp_runner").symlink_to(ROOT / "cpp_runner")
    held_out = datasets.load_digits_data()[1][:8]  # the user's own images of the C++ runner's --init example
    np.save(home / "images.npy", held_out.astype(np.float32) / 127.5 - 1)
    save_stand_in(home / "ddpm-cifar10-32")  # the released weights' folder, downloaded by the user: a small stand-in
    env = {**os.environ, "PATH": f"{home / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for lang, code, where in every_block():
        if lang != "sh" or code.lstrip().startswith("make"):
            continue
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=home, env=env, capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, f"{where}:\n{code}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return home


def test_the_shell_blocks_run_and_the_python_blocks_run_after_them(walk, monkeypatch):
    monkeypatch.chdir(walk)
    app = walk / "app"  # `from onnx_sampler import ...`: the files the README tells an app to copy, alone in a folder
    app.mkdir(exist_ok=True)
    for file in ("export/onnx_sampler.py", "plan.py", "images.py", "export/openvino_engine.py"):
        shutil.copy(ROOT / file, app)
    monkeypatch.syspath_prepend(str(app))
    for lang, code, where in every_block():
        if lang == "python":
            scope = {}
            exec(compile(code, where, "exec"), scope)
            if "frames" in scope:  # the Python API block: what its comments promise
                assert scope["x"].shape == (16, 1, 4, 4) and len(scope["frames"]) == 1000
                assert ((scope["recon"] - scope["x0"]) ** 2).mean() < 0.01


@pytest.mark.slow
def test_make_demo_runs_twice(tmp_path):
    """The quick start's demo runs again after a first run (it trains afresh), and says that the three
    executors made the same images; with a small training budget."""
    for _ in range(2):
        res = subprocess.run(["make", "demo", f"RUN={tmp_path / 'demo'}",
                              "TRAIN_FLAGS=--train-steps 20 --batch-size 32 --diffusion-steps 100",
                              "DISTILL_FLAGS=--train-steps 5 --adversarial-steps 2 --batch-size 32 --teacher-steps 8"],
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert res.stdout.count("the same images") == 2 and "demo: made" in res.stdout, res.stdout[-2000:]
        assert (tmp_path / "demo" / "chain-and-student.png").is_file()


def naming_table() -> list[tuple[str, list[str], list[str]]]:
    """(concept, flags, commands) of the naming table of docs/commands.md."""
    text = dict(PAGES)["docs/commands.md"]
    section = text[text.index("## One name per concept"):]
    section = section[:section.index("\n## ")]
    rows = []
    for line in [line for line in section.splitlines() if line.startswith("|")][2:]:
        concept, flags, commands = [c.strip() for c in line.strip("|").split("|")]
        rows.append((concept, re.findall(r"--[\w-]+", flags), [c.strip() for c in commands.split(",")]))
    return rows


def command_flags() -> dict[str, set[str]]:
    """Every option spelling of every ddpm command, and of the C++ runner (from its --help)."""
    root = typer.main.get_command(cli.app)
    found = {}
    for name, command in root.commands.items():
        subs = command.commands.items() if hasattr(command, "commands") else [("", command)]
        for sub, c in subs:
            found[f"{name} {sub}".strip()] = {o for p in c.params for o in p.opts + p.secondary_opts
                                              if o.startswith("--")} - {"--help"}
    if RUNNER.exists():
        help_text = subprocess.run([RUNNER, "--help"], capture_output=True, text=True).stdout
        found["ddpm_runner"] = set(re.findall(r"--[a-z][\w-]*", help_text)) - {"--help"}
    return found


def test_the_naming_table_is_what_the_commands_accept():
    flags = command_flags()
    table = naming_table()
    assert len(table) >= 20
    for concept, names, commands in table:
        for command in commands:
            if command == "ddpm_runner" and command not in flags:
                continue  # not built here; test_cpp_runner.py needs it anyway
            assert command in flags, f"{concept}: no command {command!r}"
            missing = [n for n in names if n not in flags[command] and not n.startswith("--no-")]
            assert not missing, f"{concept}: `{command}` lacks {missing}"
    named = {n for _, names, _ in table for n in names}
    shared = {f for f in set().union(*flags.values()) if sum(f in v for v in flags.values()) > 1}
    unnamed = {f for f in shared - named if f.replace("--no-", "--") not in named}
    assert not unnamed, f"options of several commands missing from the naming table: {sorted(unnamed)}"
