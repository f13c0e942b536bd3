"""Deployment targets: ONNX export and lint, ONNX Runtime, TensorRT (installed as ``qatgraph.backends``)."""
