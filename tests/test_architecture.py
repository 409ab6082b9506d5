"""The package's shape: what it installs, its import graph, and the one-of-each rules (the CLI's train
options are TrainConfig's fields, bench train times the step that train runs)."""
import ast
import dataclasses
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer

from ddpm_reference import bench, cli, ddpm, web

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"ddpm": "ddpm.py", "unet": "unet.py", "data": "data.py", "fd": "fd.py", "bench": "bench.py", "cli": "cli.py",
           "classifier": "classifier.py", "precision": "precision.py", "plan": "plan.py", "images": "images.py", "sampling": "sampling.py", "distill": "distill.py", "web": "web.py", "diffusers_io": "diffusers_io.py", "export": "export/__init__.py", "export.onnx_export": "export/onnx_export.py",
           "export.onnx_sampler": "export/onnx_sampler.py", "export.openvino_engine": "export/openvino_engine.py"}


def _walk_package_code(node):
    """ast.walk, leaving out the `else` of `if __package__:`: the imports of a file copied into an application."""
    yield node
    copied = isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "__package__"
    for child in ast.iter_child_nodes(node):
        if not (copied and child in node.orelse):
            yield from _walk_package_code(child)


def our_imports(name: str) -> set[str]:
    """The modules of ours (names as in MODULES) that module `name` imports, at any depth of its code."""
    full = "ddpm_reference." + name
    package = full if MODULES[name].endswith("__init__.py") else full.rpartition(".")[0]
    found = set()
    for node in _walk_package_code(ast.parse((ROOT / MODULES[name]).read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    assert not {m for m in found if m.split(".")[0] in MODULES}, f"{name} imports our files by a top-level name"
    return {m.removeprefix("ddpm_reference.") for m in found} & set(MODULES) - {name}


def test_import_graph_has_no_cycle_and_export_imports_nothing_of_ours_outside_it():
    graph = {name: our_imports(name) for name in MODULES}
    assert graph["ddpm"] == {"unet", "precision", "plan", "images"}, graph  # nothing of export/, none of its users
    assert graph["precision"] == graph["plan"] == graph["images"] == set(), graph
    assert graph["data"] == {"ddpm"} and graph["fd"] == {"ddpm", "data"}, graph
    assert graph["distill"] == {"ddpm", "plan"}, graph  # a Trainer with another loss
    assert graph["web"] == set(), graph  # the page's server: the page ports the plan, it does not import it
    assert "cli" not in set().union(*graph.values()), graph  # nothing imports the command line
    assert "sampling" not in graph["ddpm"] | graph["export.onnx_sampler"], graph  # the runs are users of both
    assert graph["unet"] == set() and graph["export.openvino_engine"] == set(), graph
    # what an app copies (onnx_sampler.py, plan.py, images.py; openvino_engine.py when engine="openvino" is asked for)
    assert graph["export.onnx_sampler"] == {"plan", "images", "export.openvino_engine"}, graph
    assert graph["export.onnx_export"] == {"images", "export.onnx_sampler"}, graph

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        for nxt in graph[node]:
            visit(nxt, [*path, node])
    for name in graph:
        visit(name, [])


@pytest.mark.slow
def test_the_wheel_installs_one_unambiguous_top_level_package(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ddpm_reference"}, top
    assert {"ddpm_reference/ddpm.py", "ddpm_reference/unet.py", "ddpm_reference/export/onnx_sampler.py",
            "ddpm_reference/export/onnx_export.py", "ddpm_reference/cli.py", "ddpm_reference/data.py",
            "ddpm_reference/plan.py", "ddpm_reference/images.py", "ddpm_reference/web.py",
            *(f"ddpm_reference/web/{name}" for name in web.PAGE_FILES)} <= set(names)


def test_a_users_unet_and_export_in_the_working_folder_change_nothing(tmp_path):
    (tmp_path / "unet.py").write_text("raise SystemExit('the user unet.py was imported')\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "__init__.py").write_text("raise SystemExit('the user export/ was imported')\n")
    (tmp_path / "ddpm.py").write_text("raise SystemExit('the user ddpm.py was imported')\n")
    for cmd in ([sys.executable, "-m", "ddpm_reference.cli", "info", "--preset", "digits"],
                [str(Path(sys.executable).parent / "ddpm"), "info", "--preset", "digits"]):
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "params 1," in res.stdout, (cmd, res.stdout, res.stderr)
    probe = ("import sys; sys.path.insert(0, '.'); from ddpm_reference import ddpm; "
             "print(ddpm.unet.__file__); print(ddpm.plans.__file__)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert all(Path(line).resolve().is_relative_to(ROOT) for line in res.stdout.split()), res.stdout


def test_the_core_imports_neither_rich_nor_typer_and_has_no_mid_file_imports():
    """Importing ddpm (or the torch-free sampler) loads no CLI library, nor OpenVINO (loaded when its engine is
    asked for); every import of ddpm.py is at its top."""
    probe = ("import sys; from ddpm_reference import ddpm; from ddpm_reference.export import onnx_sampler; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'typer', 'click', 'openvino'}))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    tree = ast.parse((ROOT / "ddpm.py").read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    first_other = next(i for i, node in enumerate(tree.body[1:], 1) if not isinstance(node, (ast.Import, ast.ImportFrom)))
    assert all(tree.body.index(node) < first_other for node in top), "an import in the middle of ddpm.py"
    assert len((ROOT / "ddpm.py").read_text().splitlines()) <= 1000


def test_train_options_are_the_fields_of_train_config():
    command = typer.main.get_command(cli.app).commands["train"]
    options = {p.name: p for p in command.params}
    fields = {f.name: f for f in dataclasses.fields(ddpm.TrainConfig)}
    assert set(options) == set(fields) | {"resume", "overwrite"}
    for name, f in fields.items():
        assert options[name].default == f.default, name
        assert ddpm.option_flag(f) in options[name].opts, options[name].opts
    ctx = command.make_context("train", ["--batch-size", "8", "--diffusion-steps", "50", "--flip", "--image-size", "16"])
    assert (ctx.params["batch_size"], ctx.params["T"], ctx.params["flip"], ctx.params["image_size"]) == (8, 50, True, 16)


@pytest.mark.slow
def test_bench_train_times_the_step_that_train_runs(monkeypatch):
    calls = []
    step = ddpm.Trainer.train_step
    monkeypatch.setattr(ddpm.Trainer, "train_step", lambda self, data: (calls.append(self.step), step(self, data)))
    row = bench.bench_train("digits", batch=4, steps=2, repeats=1, device="cpu")
    assert calls == [0, 1, 2, 3]  # a warm-up timing and one measured timing of 2 steps each
    assert row["images_per_s"] > 0


def test_save_checkpoint_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ddpm.save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(ddpm.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ddpm.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ddpm.torch.load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_version_is_the_package_metadata():
    import importlib.metadata
    import tomllib
    from ddpm_reference.export import onnx_export
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ddpm.__version__ == onnx_export.version() == importlib.metadata.version("ddpm-reference") == declared
