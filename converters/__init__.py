"""Converters: PyTorch and ONNX checkpoints -> lstm-infer model directories."""
