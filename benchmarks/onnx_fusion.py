"""What fusing the elementwise ops gains in the ONNX path, on an exported file (BENCHMARKS.md, "OpenVINO"):
network evaluations/s of onnxruntime's CPU provider at each graph optimisation level (none, basic: constant
folding and redundant nodes; extended: its fused CPU contrib ops, e.g. Conv+activation, Gelu, LayerNorm; all:
extended plus layout), and of OpenVINO in fp32 and bf16 (its own fusions), with the share of time each engine's
profile gives to each kind of node.

    python benchmarks/onnx_fusion.py runs/demo/model.onnx --batch-size 256
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort

LEVELS = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def median_s(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def shares(durations: dict) -> str:
    total = sum(durations.values())
    top = sorted(durations.items(), key=lambda kv: -kv[1])[:6]
    return ", ".join(f"{name} {d / total:.0%}" for name, d in top)


def onnxruntime_rows(path: str, feed: dict, repeats: int) -> list[dict]:
    rows = []
    for name, level in LEVELS.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        with tempfile.TemporaryDirectory() as tmp:
            options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            import onnx
            nodes = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
        seconds = median_s(lambda: session.run(None, feed), repeats)
        profiled = ort.SessionOptions()
        profiled.graph_optimization_level, profiled.enable_profiling = level, True
        profiled.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
        probe = ort.InferenceSession(path, profiled, providers=["CPUExecutionProvider"])
        for _ in range(3):
            probe.run(None, feed)
        durations = collections.Counter()
        for event in json.load(open(probe.end_profiling())):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                durations[event["args"]["op_name"]] += event["dur"]
        rows.append({"engine": f"onnxruntime, optimisation {name}", "s": seconds, "nodes": sum(nodes.values()),
                     "profile": shares(durations)})
    return rows


def openvino_rows(path: str, feed: dict, repeats: int) -> list[dict]:
    import openvino as ov
    core, rows = ov.Core(), []
    for hint in ("f32", "bf16"):
        model = core.read_model(path)
        model.reshape({name: list(value.shape) for name, value in feed.items()})
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        seconds = median_s(lambda: request.infer(feed), repeats)
        durations = collections.Counter()
        for info in request.profiling_info:
            durations[info.node_type] += info.real_time.total_seconds()
        nodes = len(compiled.get_runtime_model().get_ops())
        rows.append({"engine": f"OpenVINO {hint}", "s": seconds, "nodes": nodes, "profile": shares(durations)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    c, h, w = (int(s) for s in session.get_modelmeta().custom_metadata_map["ddpm.image_shape"].split(","))
    feed = {"x": np.random.default_rng(0).standard_normal((args.batch_size, c, h, w)).astype(np.float32),
            "t": np.full(args.batch_size, 500, dtype=np.int64)}
    rows = onnxruntime_rows(args.model, feed, args.repeats) + openvino_rows(args.model, feed, args.repeats)
    base = rows[-3]["s"]  # onnxruntime at its default level, all
    print("| engine | graph nodes | network evals/s | vs onnxruntime (all) | time by node type (profile) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['nodes']} | {args.batch_size / r['s']:.0f} | {base / r['s']:.2f} | {r['profile']} |")


if __name__ == "__main__":
    main()
