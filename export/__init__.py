"""Offline export of the networks: torch → ONNX → TensorRT, validated against golden outputs."""
