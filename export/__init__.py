"""ltzoo export: one fused ONNX graph per ensemble (fp32, fp16, INT8) and TensorRT engines.

Submodules are imported on use so ``import export`` stays light::

    from ltzoo.export.onnx import export_onnx, check_parity, quantize_int8, read_metadata
"""

__all__ = ["onnx", "tensorrt"]
