"""Emit: a plan and its fx graph -> an artifact (per-device segments + schedule) on disk or in memory; ONNX export."""
