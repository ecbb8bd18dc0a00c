"""Frontends: a model (nn.Module, zoo name, file.py:factory, ONNX file) -> a traced graph with shapes, FLOPs and bytes."""
