"""Whole-pipeline tools over the artifacts the stages write: the demo (every stage on one task), evaluate,
export to ONNX and the ONNX runner (onnx_model). They may import any package of pipeline/; nothing in the stages
imports them."""
