"""The C++ library against hostile files, under the sanitizers.

Hundreds of mutations of real exports (the project's exporter on small U-Nets: one unconditional, one
class-conditional with learned variances) - metadata missing, empty, garbage, huge or negative, the JSON list of
class names among them; graph inputs and outputs renamed, retyped, reshaped, added or removed; NaN and inf
outputs; truncated files; random bytes - are sampled by cpp_runner/tests/sample_each.cpp, built with
AddressSanitizer and UndefinedBehaviorSanitizer, in one process, which writes each valid run's samples with
ddpm::save_images (.npy, .npz, .png). Every file must give a one-line error (those that are broken) or samples and
files equal to the onnxruntime sampler's and the Python writer's (those that are valid); a sanitizer report
aborts the driver and fails the test. The row noise that is drawn on a second thread runs under ThreadSanitizer.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import RUNNER_DIR

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

T, IMAGE, N = 200, (1, 8, 8), 3  # the driver samples N images in batches of 2, seed 5
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
                 "TSAN_OPTIONS": "halt_on_error=1:exitcode=66"}


def build(runner: Path, name: str, sanitize: str) -> Path:
    """cpp_runner built into cpp_runner/<name> with -fsanitize=<sanitize>, reusing the main build's headers."""
    env = {**os.environ, "PYTHON": sys.executable, "BUILD_DIR": str(RUNNER_DIR / name),
           "CMAKE_ARGS": f"-DDDPM_SANITIZE={sanitize} -DDDPM_RUNNER_TESTS=ON"}
    headers = runner.parent / "ort-headers" / "include"
    if headers.is_dir():
        env["ORT_HEADERS_DIR"] = str(headers)
    proc = subprocess.run(["sh", str(RUNNER_DIR / "build.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return RUNNER_DIR / name


@pytest.fixture(scope="module")
def asan(runner) -> Path:
    return build(runner, "build-asan", "address,undefined")


# ---------------------------------------------------------------- real exports
@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    import torch
    from ddpm_reference import ddpm, unet
    from ddpm_reference.export.onnx_export import export_onnx
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for name, variance, classes in [("plain", "fixed_small", ()), ("cond", "learned_range", ("a", "b", "c"))]:
        torch.manual_seed(len(classes))
        net = unet.UNet(in_channels=1, out_channels=2 if variance == "learned_range" else 1, ch=32, ch_mult=(1, 1),
                        num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, image_size=8,
                        num_classes=len(classes) or None)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out[name] = d / f"{name}.onnx"
        export_onnx(net.eval(), ddpm.Diffusion(ddpm.beta_schedule("linear", T), "eps", variance), IMAGE, out[name],
                    classes=list(classes))
    return out


# ---------------------------------------------------------------- mutations
def set_meta(model, **changes):
    """changes: key -> value, or None to delete the key."""
    meta = {p.key: p.value for p in model.metadata_props}
    for k, v in changes.items():
        meta.pop(k, None) if v is None else meta.__setitem__(k, v)
    del model.metadata_props[:]
    helper.set_model_props(model, meta)
    return model


def rename(model, old: str, new: str):
    g = model.graph
    for v in list(g.input) + list(g.output):
        if v.name == old:
            v.name = new
    for node in g.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    return model


def wrap_input(model, name: str, value_info, nodes):
    """Replace input `name` by `value_info` (named name + "_in"), converted to the original by `nodes`."""
    g = model.graph
    rename(model, name, name + "_orig")
    i = [v.name for v in g.input].index(name + "_orig")
    g.input.remove(g.input[i])
    g.input.insert(i, value_info)
    for node in reversed(nodes):
        g.node.insert(0, node)
    return model


def x_dims(model, *dims):
    """x declared with these dims (ints fixed, strs symbolic), the graph unchanged."""
    x = next(v for v in model.graph.input if v.name == "x")
    for d, new in zip(x.type.tensor_type.shape.dim, dims):  # dim_value and dim_param are a oneof
        if isinstance(new, int):
            d.dim_value = new
        else:
            d.dim_param = new
    return model


def add_input(model, value_info):
    model.graph.input.append(value_info)
    return model


def add_output(model, value_info):
    model.graph.output.append(value_info)
    return model


def remove_input(model, name: str):
    model.graph.input.remove(next(v for v in model.graph.input if v.name == name))
    return model


def wrap_output(model, nodes, value_info):
    """model_output becomes raw, and `nodes` (reading raw) make the new output `value_info`."""
    g = model.graph
    rename(model, "model_output", "raw")
    g.node.extend(nodes)
    g.output.remove(g.output[0])
    if value_info is not None:  # None: no output at all
        g.output.append(value_info)
    return model


def const(name: str, array) -> "onnx.NodeProto":
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(array), name))


def out_info(channels, dims=None):
    return helper.make_tensor_value_info("model_output", TensorProto.FLOAT, dims or ["batch", channels, 8, 8])


GARBAGE = ["", "abc", "-1", "0", "nan", "inf", "1e999", "9" * 30, "\u0661", " 1", "1 ", "1,2", ",", "x" * 100_000]


def metadata_cases(meta: dict[str, str], conditional: bool):
    """(name, changes, expectation): "error", "same" (valid, the original's samples) or "valid" (the samples of
    the onnxruntime sampler on the changed file)."""
    betas = meta["ddpm.betas"].split(",")
    invalid = {
        "ddpm.format": GARBAGE + ["2", "1.0", "01"],
        "ddpm.num_timesteps": GARBAGE + ["199", "201", "100001", "-200", "2e2", "0x10", "200 "],
        "ddpm.betas": GARBAGE + [",".join(["0"] + betas[1:]), ",".join(["1.5"] + betas[1:]),
                                 ",".join(["-1e-4"] + betas[1:]), ",".join(betas[:-1] + ["inf"]),
                                 ",".join(betas[:-1] + ["nan"]), ",".join(betas[:-1]), ",".join(betas + ["1e-4"]),
                                 ",".join(betas) + ",", ";".join(betas), "," * 2_000_000,
                                 ",".join(betas[:-1] + ["1"]),  # alpha_bar_T = 0 with eps
                                 ",".join(betas[:-1] + ["0x1p-10"])],
        "ddpm.parameterization": GARBAGE + ["EPS", "eps ", "epsilon", "x_0"],
        "ddpm.variance": GARBAGE + ["learned", "fixed", "LEARNED_RANGE",
                                    "fixed_small" if conditional else "learned_range"],  # the wrong channel count
        "ddpm.image_shape": GARBAGE + ["1,8", "1,8,8,8", "0,8,8", "-1,8,8", "1,-8,8", "3,8,8", "1,16,16", "1,8,16",
                                       "4096,4096,4096", "1,100000000,100000000", "9223372036854775807,1,1",
                                       "1,8,8,", "a,b,c", "1, 8, 8"],
        "ddpm.clip_denoised": GARBAGE + ["True", "1", "yes", "TRUE"],
        "ddpm.timestep_dtype": GARBAGE + ["int32", "INT64", "float"],
    }
    if conditional:
        invalid["ddpm.num_classes"] = GARBAGE + ["2", "4", "1048577", "-3"]
        invalid["ddpm.null_label"] = GARBAGE + ["2", "4"]
    for key, values in invalid.items():
        yield f"{key} missing", {key: None}, "error"
        for i, v in enumerate(values):
            if v != meta[key]:
                yield f"{key} bad {i}", {key: v}, "error"
    ignored = {"ddpm.version": ["", "x" * 100_000, "\u00e9"], "ddpm.data_range": ["", "0,1", "garbage"],
               "ddpm.quantization": ["int8"], "ddpm.some_future_key": ["x" * 100_000], "foo": ["bar"]}
    for key, values in ignored.items():
        yield f"{key} deleted", {key: None}, "same"
        for i, v in enumerate(values):
            yield f"{key} ignored {i}", {key: v}, "same"
    for i, (names, expect) in enumerate(class_name_lists(conditional)):
        yield f"ddpm.class_names {expect} {i}", {"ddpm.class_names": names}, expect
    if conditional:
        yield "class_names deleted", {"ddpm.class_names": None}, "same"
        yield "classes 0", {"ddpm.num_classes": "0", "ddpm.null_label": "0", "ddpm.class_names": "[]"}, "error"
        yield "no classes", {"ddpm.num_classes": None, "ddpm.null_label": None, "ddpm.class_names": None}, "error"
        yield "classes 2", {"ddpm.num_classes": "2", "ddpm.null_label": "2", "ddpm.class_names": '["a", "b"]'}, "valid"
        yield "classes 5", {"ddpm.num_classes": "5", "ddpm.null_label": "5",
                            "ddpm.class_names": '["a", "b", "c", "d", "e"]'}, "error"  # null label 5: no such row
    else:
        yield "variance fixed_large", {"ddpm.variance": "fixed_large"}, "valid"
        yield "clip false", {"ddpm.clip_denoised": "false"}, "valid"
    for par in ("x0", "v"):
        yield f"parameterization {par}", {"ddpm.parameterization": par}, "valid"
    yield "T 100", {"ddpm.num_timesteps": "100", "ddpm.betas": ",".join(betas[:100])}, "valid"
    yield "betas halved", {"ddpm.betas": ",".join(repr(float(b) / 2) for b in betas)}, "valid"


def class_name_lists(conditional: bool):
    """(ddpm.class_names, expectation): a JSON list of exactly K strings is read (its escapes decoded as Python's
    json.loads decodes them), anything else refused (test_class_name_cases_are_pythons_json); the names do not
    change the samples (the driver gives labels by index)."""
    if not conditional:
        return [("[]", "same"), (" [ ] ", "same"), ('["a"]', "error"), ('[""]', "error"), ("{}", "error")] + \
            [(g, "error") for g in GARBAGE]
    bad = ['["a", "b"]', '["a", "b", "c", "d"]', '["a", "b", 3]', '["a" "b" "c"]', '["a", "b", "c",]',
           '["a", "b", "c"] x', '["a", "b", "c"', '["a", "b", "c', '["a", "b", "c\\"]', "[", "]", "[]", "[,]",
           '{"a": 1}', "null", '"a"', '["a\\x", "b", "c"]', '["\\ud800\\", "b", "c"]', '["\\u12", "b", "c"]', '["\\u12G4", "b", "c"]',
           '["a\nb", "b", "c"]', '["a\tb", "b", "c"]', '[["a"], "b", "c"]', '[null, "b", "c"]', "['a', 'b', 'c']",
           '["a", "b", "c"]]', '[' + '"x",' * 1_000_000 + '"x"]', "[" * 100_000, '["' + "\\" * 99_999 + '"]']
    good = ['["a", "b", "c"]', ' \t[ "a" ,\n"b",\r"c" ] \n', '["2", "1", "0"]', '["a", "a", "a"]', '["", "", ""]',
            '["\\u00e9\\ud83d\\ude00", "\\"quoted\\"", "back\\\\slash\\/\\b\\f\\n\\r\\t"]', '["\\u0000", "b", "c"]',
            '["\\ud800", "\\udc00", "\\ud800\\u0041"]',  # lone surrogates, as Python's json takes them
            '["\u00e9t\u00e9", "\u4e2d", "c"]', '["' + "x" * 100_000 + '", "b", "c"]']
    return [(g, "error") for g in GARBAGE + bad] + [(g, "same") for g in good]


def test_class_name_cases_are_pythons_json():
    """The cases' verdicts are json.loads's: a list of K strings. (The onnxruntime sampler is laxer: it also takes
    other JSON values in the list, as their str().)"""
    for conditional in (True, False):
        for names, expect in class_name_lists(conditional):
            try:
                value = json.loads(names)
            except (ValueError, RecursionError):
                value = None
            ok = isinstance(value, list) and len(value) == (3 if conditional else 0) and all(isinstance(v, str) for v in value)
            assert ok == (expect == "same"), names[:100]


def graph_cases(conditional: bool):
    """(name, mutate(model), expectation) for the graph's inputs and outputs, and NaN / inf outputs."""
    C_out = 2 if conditional else 1
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    cases = [
        ("x renamed", lambda m: rename(m, "x", "image"), "error"),
        ("t renamed", lambda m: rename(m, "t", "timestep"), "error"),
        ("output renamed", lambda m: rename(m, "model_output", "eps"), "error"),
        ("x float64", lambda m: wrap_input(m, "x", helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 1, 8, 8]),
                                          [helper.make_node("Cast", ["x"], ["x_orig"], to=f32)]), "error"),
        ("x float16", lambda m: wrap_input(m, "x", helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 1, 8, 8]),
                                          [helper.make_node("Cast", ["x"], ["x_orig"], to=f32)]), "error"),
        ("t int32", lambda m: wrap_input(m, "t", helper.make_tensor_value_info("t", TensorProto.INT32, ["batch"]),
                                        [helper.make_node("Cast", ["t"], ["t_orig"], to=i64)]), "error"),
        ("t float", lambda m: wrap_input(m, "t", helper.make_tensor_value_info("t", f32, ["batch"]),
                                        [helper.make_node("Cast", ["t"], ["t_orig"], to=i64)]), "error"),
        ("x rank 3", lambda m: wrap_input(m, "x", helper.make_tensor_value_info("x", f32, ["batch", 8, 8]),
                                         [const("ax1", np.array([1])), helper.make_node("Unsqueeze", ["x", "ax1"], ["x_orig"])]), "error"),
        ("x rank 5", lambda m: wrap_input(m, "x", helper.make_tensor_value_info("x", f32, ["batch", 1, 1, 8, 8]),
                                         [const("ax1", np.array([1])), helper.make_node("Squeeze", ["x", "ax1"], ["x_orig"])]), "error"),
        ("t rank 2", lambda m: wrap_input(m, "t", helper.make_tensor_value_info("t", i64, ["batch", 1]),
                                         [const("ax1", np.array([1])), helper.make_node("Squeeze", ["t", "ax1"], ["t_orig"])]), "error"),
        ("t a sequence", lambda m: wrap_input(m, "t", helper.make_tensor_sequence_value_info("t", i64, ["batch"]),
                                             [const("zero", np.array(0)), helper.make_node("SequenceAt", ["t", "zero"], ["t_orig"])]), "error"),
        ("x 3 channels", lambda m: wrap_input(m, "x", helper.make_tensor_value_info("x", f32, ["batch", 3, 8, 8]),
                                             [const("sl0", np.array([0])), const("sl1", np.array([1])),
                                              helper.make_node("Slice", ["x", "sl0", "sl1", "sl1"], ["x_orig"])]), "error"),
        ("x batch fixed to 1", lambda m: x_dims(m, 1), "error"),  # the driver's batch is 2
        ("x dims symbolic", lambda m: x_dims(m, "b", "c", "h", "w"), "same"),
        ("output channels doubled", lambda m: wrap_output(m, [helper.make_node("Concat", ["raw", "raw"], ["model_output"], axis=1)],
                                                          out_info(2 * C_out)), "error"),
        ("output channels doubled, declared symbolic", lambda m: wrap_output(
            m, [helper.make_node("Concat", ["raw", "raw"], ["model_output"], axis=1)], out_info("c")), "error"),
        ("output rank 3", lambda m: wrap_output(m, [const("ax1", np.array([1])), helper.make_node("Squeeze", ["raw", "ax1"], ["model_output"])]
                                                if not conditional else
                                                [const("sh", np.array([0, -1, 8])), helper.make_node("Reshape", ["raw", "sh"], ["model_output"])],
                                                helper.make_tensor_value_info("model_output", f32, ["batch", "n", 8])), "error"),
        ("output float64", lambda m: wrap_output(m, [helper.make_node("Cast", ["raw"], ["model_output"], to=TensorProto.DOUBLE)],
                                                 helper.make_tensor_value_info("model_output", TensorProto.DOUBLE, ["batch", C_out, 8, 8])), "error"),
        ("output int64", lambda m: wrap_output(m, [helper.make_node("Cast", ["raw"], ["model_output"], to=i64)],
                                               helper.make_tensor_value_info("model_output", i64, ["batch", C_out, 8, 8])), "error"),
        ("extra output", lambda m: add_output(m, helper.make_tensor_value_info(m.graph.node[0].output[0], f32, None)), "error"),
        ("extra input", lambda m: add_input(m, helper.make_tensor_value_info("z", f32, ["batch", 1, 8, 8])), "error"),
        ("t removed", lambda m: remove_input(m, "t"), "error"),
        ("output removed", lambda m: wrap_output(m, [], None), "error"),
        ("output NaN", lambda m: wrap_output(m, [const("nan", np.array(np.nan, np.float32)),
                                                 helper.make_node("Add", ["raw", "nan"], ["model_output"])], out_info(C_out)), "error"),
        ("output divided by 0", lambda m: wrap_output(m, [const("zero", np.array(0, np.float32)),
                                                         helper.make_node("Div", ["raw", "zero"], ["model_output"])], out_info(C_out)), "error"),
        # inf at t = 0 only, the last row: clipping would turn it into a plausible image.
        ("output inf at t 0", lambda m: wrap_output(m, [
            const("ax", np.array([1, 2, 3])), const("t0", np.array(0, np.int64)), const("inf", np.array(np.inf, np.float32)),
            const("zero", np.array(0, np.float32)), helper.make_node("Unsqueeze", ["t", "ax"], ["t4"]),
            helper.make_node("Equal", ["t4", "t0"], ["at0"]), helper.make_node("Where", ["at0", "inf", "zero"], ["bump"]),
            helper.make_node("Add", ["raw", "bump"], ["model_output"])], out_info(C_out)), "error"),
    ]
    if conditional:
        cases += [
            ("y renamed", lambda m: rename(m, "y", "label"), "error"),
            ("y float", lambda m: wrap_input(m, "y", helper.make_tensor_value_info("y", f32, ["batch"]),
                                            [helper.make_node("Cast", ["y"], ["y_orig"], to=i64)]), "error"),
            ("y a sequence", lambda m: wrap_input(m, "y", helper.make_tensor_sequence_value_info("y", i64, ["batch"]),
                                                 [const("zero", np.array(0)), helper.make_node("SequenceAt", ["y", "zero"], ["y_orig"])]), "error"),
            ("y removed", lambda m: remove_input(m, "y"), "error"),
            ("output channels halved", lambda m: wrap_output(m, [const("s0", np.array([0])), const("s1", np.array([1])),
                                                                helper.make_node("Slice", ["raw", "s0", "s1", "s1"], ["model_output"])],
                                                             out_info(1)), "error"),
        ]
    return cases


@pytest.fixture(scope="module")
def cases(exports, tmp_path_factory):
    """(file, expectation, reference file, name, sampled): expectation "error", "same" (the samples of the
    reference, the unchanged export), "valid" (the onnxruntime sampler's samples on the file itself), "either"
    (an error, or the reference's samples) or "valid-or-error" (an error, or the onnxruntime sampler's samples on
    the file itself); sampled: the case can reach the sampling loop (a graph change, or
    metadata that is not refused at load). About 600 files of 1 MB: removed afterwards."""
    d = tmp_path_factory.mktemp("hostile")
    out = []

    def save(model, name, expect, ref, sampled):
        path = d / f"{len(out):04d}.onnx"
        onnx.save(model, str(path))
        out.append((path, expect, ref, name, sampled))

    for kind, src in exports.items():
        base = onnx.load(str(src))
        meta = {p.key: p.value for p in base.metadata_props}
        for name, changes, expect in metadata_cases(meta, kind == "cond"):
            save(set_meta(copy.deepcopy(base), **changes), f"{kind}: {name}", expect, src, expect != "error")
        for name, mutate, expect in graph_cases(kind == "cond"):
            save(mutate(copy.deepcopy(base)), f"{kind}: {name}", expect, src, True)
    data = exports["plain"].read_bytes()
    rng = np.random.RandomState(0)
    cuts = sorted(set(np.linspace(0, len(data) - 1, 40).astype(int).tolist() + [len(data) - 1, len(data) - 30]))
    for cut in cuts:
        path = d / f"{len(out):04d}.onnx"
        path.write_bytes(data[:cut])
        out.append((path, "either", exports["plain"], f"truncated at {cut}", False))
    for i in range(20):  # bytes changed in place: the graph (or a weight, or the metadata) corrupted, lengths kept
        blob = bytearray(data)
        for at in rng.randint(0, len(data), 1 + i // 4):
            blob[at] = rng.randint(256)
        path = d / f"{len(out):04d}.onnx"
        path.write_bytes(bytes(blob))
        out.append((path, "valid-or-error", path, f"bytes changed {i}", True))
    for i, blob in enumerate([b"", bytes(1000), b"\x08\x07", data[:16] + rng.bytes(5000)]
                             + [rng.bytes(rng.randint(1, 100_000)) for _ in range(16)]):
        path = d / f"{len(out):04d}.onnx"
        path.write_bytes(blob)
        out.append((path, "error", exports["plain"], f"random bytes {i}", False))
    yield out
    shutil.rmtree(d, ignore_errors=True)


def onnxruntime_samples(path: Path, sampler: str, steps: int) -> tuple[np.ndarray, list[int] | None]:
    """The driver's run in the onnxruntime sampler: (samples, labels)."""
    from ddpm_reference.export.onnx_sampler import OnnxSampler
    python = OnnxSampler(path, provider="cpu", threads=1)
    labels = [i % python.num_classes for i in range(N)] if python.num_classes else None
    return python.sample(N, sampler, steps, seed=5, batch=2, labels=labels, guidance=2.0 if labels else 1.0), labels


def assert_files_are_pythons(stem: str, x: np.ndarray, labels: list[int] | None) -> None:
    """stem.npz and stem.png (ddpm::save_images) hold what export/onnx_sampler.save_images writes for x."""
    from PIL import Image
    from ddpm_reference.export.onnx_sampler import image_grid, to_uint8
    npz = np.load(stem + ".npz")
    assert npz.files == (["arr_0", "arr_1"] if labels else ["arr_0"]), npz.files
    np.testing.assert_array_equal(npz["arr_0"], to_uint8(x).transpose(0, 2, 3, 1))
    if labels:
        assert npz["arr_1"].dtype == np.int64 and npz["arr_1"].tolist() == labels
    columns = -(-len(x) // len(set(labels))) if labels else None  # a row per class
    np.testing.assert_array_equal(np.asarray(Image.open(stem + ".png")), image_grid(to_uint8(x), columns=columns))


@pytest.mark.parametrize("path,sampler", [("host", "ancestral"), ("step-graph", "dpmpp2m")])
def test_hostile_files_are_clean_errors_or_correct_runs_under_asan_ubsan(asan, cases, path, sampler):
    """Every file on the host path; on the step-graph path (the CUDA path's update, on the CPU) those that can
    reach the sampling loop."""
    steps = 3
    cases = cases if path == "host" else [c for c in cases if c[4]]
    args = [str(asan / "ddpm_sample_each"), "--sampler", sampler, "--steps", str(steps),
            "--step-graph", "1" if path == "step-graph" else "0"] + [str(c[0]) for c in cases]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1200, env={**os.environ, **SANITIZER_ENV})
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"crashed on {lines[-1] if lines else '?'}:\n{proc.stderr[-4000:]}"
    assert len(lines) == len(cases) and not proc.stderr.strip(), proc.stderr[-2000:]
    references = {}
    for (file, expect, ref, name, _), line in zip(cases, lines):
        got_file, status, *message = line.split("\t")
        assert got_file == str(file) and status in ("ok", "error"), line
        if status == "error":
            assert expect in ("error", "either", "valid-or-error"), f"{name}: {message}"
            assert len(message) == 1 and message[0].strip(), f"{name}: an error needs a message"
            continue
        assert expect != "error", f"{name}: ran, but should have been refused"
        reference = ref if expect in ("same", "either") else file
        if reference not in references:
            references[reference] = onnxruntime_samples(reference, sampler, steps)
        want, labels = references[reference]
        got = np.load(str(file) + ".npy")
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-3, name
        assert_files_are_pythons(str(file), got, labels)
    statuses = [line.split("\t")[1] for line in lines]
    assert statuses.count("ok") >= 20 and statuses.count("error") >= (300 if path == "host" else 40)


def test_hostile_files_through_the_command_are_one_line_and_status_2(asan, cases, exports, tmp_path):
    """The command over a sample of the hostile files, under the same sanitizers: exit 2 with one line, or 0; and
    classes given by name or index, or neither."""
    for file, expect, _, name, _ in cases[::15]:
        proc = subprocess.run([str(asan / "ddpm_runner"), "--model", str(file), "--num-samples", "2", "--steps", "2",
                               "--sampler", "ddim", "--out", str(tmp_path / "x.npz")], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **SANITIZER_ENV})
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == 2:
            assert expect not in ("same", "valid") and len(lines) == 1 and lines[0].startswith("ddpm_runner: error: "), \
                (name, proc.stderr[-2000:])
        else:
            assert proc.returncode == 0 and expect != "error", (name, proc.returncode, proc.stderr[-2000:])
    for classes, status in [("c, a,b", 0), ("2,0", 0), ("a,", 2), ("d", 2), ("-1", 2), ("9" * 30, 2)]:  # names, indices
        proc = subprocess.run([str(asan / "ddpm_runner"), "--model", str(exports["cond"]), "--num-samples", "3",
                               "--steps", "2", "--sampler", "ddim", "--classes", classes, "--out", str(tmp_path / "c.npz")],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **SANITIZER_ENV})
        assert proc.returncode == status and (status == 0 or "not a class of this model (a, b, c; or 0..2)" in proc.stderr), \
            (classes, proc.stderr[-2000:])


# ---------------------------------------------------------------- the noise thread under ThreadSanitizer
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the noise thread runs only when a core is free for it")
def test_noise_thread_under_tsan_matches_python(runner, exports, tmp_path):
    """--threads 1 on two or more cores leaves one free, and 256 images of 8x8 are 2^14 floats: each row's z is
    drawn on the second thread while the network runs. ThreadSanitizer exits 66 on a race."""
    tsan = build(runner, "build-tsan", "thread")
    out = tmp_path / "x.npy"
    for extra in ([], ["--step-graph"]):
        proc = subprocess.run([str(tsan / "ddpm_runner"), "--model", str(exports["plain"]), "--num-samples", "256",
                               "--threads", "1", "--sampler", "ddim", "--eta", "1", "--steps", "3", "--seed", "4",
                               "--out", str(out), *extra], capture_output=True, text=True, timeout=600,
                              env={**os.environ, **SANITIZER_ENV})
        assert proc.returncode == 0, proc.stderr[-4000:]
        from ddpm_reference.export.onnx_sampler import OnnxSampler
        want = OnnxSampler(exports["plain"], provider="cpu", threads=1).sample(256, "ddim", 3, eta=1.0, seed=4)
        assert np.abs(np.load(out) - want).max() <= 1e-3


# ---------------------------------------------------------------- graphs the checks must not refuse
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_quantized_and_fp16_exports_run_unchanged(runner, tmp_path, precision):
    """Only the graph's inputs and outputs are checked: an int8 QDQ or float16 export (other operators inside, the
    same float32/int64 interface) samples as the onnxruntime sampler does."""
    import torch
    from ddpm_reference import ddpm, unet
    from ddpm_reference.export.onnx_export import export_onnx
    from ddpm_reference.export.onnx_sampler import OnnxSampler
    torch.manual_seed(0)
    net = unet.UNet(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.0, image_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"{precision}.onnx"
    calibration = np.random.RandomState(0).uniform(-1, 1, (64, *IMAGE)).astype(np.float32)
    export_onnx(net.eval(), ddpm.Diffusion(ddpm.beta_schedule("linear", T), "eps", "fixed_small"), IMAGE, path,
                precision=precision, calibration_images=calibration)
    assert {n.op_type for n in onnx.load(str(path)).graph.node} & {"QuantizeLinear", "Cast"}  # not the fp32 graph
    proc = subprocess.run([str(runner), "--model", str(path), "--num-samples", "3", "--sampler", "ddim", "--steps", "5",
                           "--seed", "1", "--out", str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = OnnxSampler(path, provider="cpu").sample(3, "ddim", 5, seed=1)
    assert np.abs(np.load(tmp_path / "x.npy") - want).max() <= 1e-3
