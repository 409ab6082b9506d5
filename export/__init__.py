"""torch -> ONNX export of eps_theta, and the onnxruntime sampler (onnx_sampler.py needs no torch)."""
