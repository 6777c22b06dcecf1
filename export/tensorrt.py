"""Build a TensorRT engine from a fused ltzoo ONNX export (GPU only).

Needs the ``tensorrt`` Python package and a CUDA GPU (``pip install ltzoo[gpu]``);
otherwise :func:`require_tensorrt` (called first by :func:`build_engine`) raises a
:class:`zoo.errors.UnavailableError` saying so.

The engine's ``log_prior_shift`` is a required input of shape ``(1, num_classes)`` (one
prior per batch; the default is in the ONNX metadata, :func:`export.onnx.read_metadata`).
Exports from before it became required in the ONNX file too had it as an input with a
default initializer, which TensorRT's parser would freeze into a weight: that initializer
is dropped first.
"""

from __future__ import annotations

from pathlib import Path

from ltzoo.zoo.errors import UnavailableError

INSTALL_HINT = (
    "install the GPU extras with `pip install ltzoo[gpu]` (tensorrt>=10, onnxruntime-gpu)"
)


def require_tensorrt():  # -> module
    """The ``tensorrt`` module; :class:`UnavailableError` without it or without a CUDA GPU."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UnavailableError(f"TensorRT is not installed: {INSTALL_HINT}") from exc
    import torch

    if not torch.cuda.is_available():
        raise UnavailableError(
            f"TensorRT needs a CUDA GPU and none is available ({INSTALL_HINT} on a GPU machine)"
        )
    return trt


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    fp16: bool = True,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_gib: float = 4.0,
) -> Path:
    """Parse ``onnx_path``, build a serialized engine with a dynamic-batch profile, write it."""
    trt = require_tensorrt()
    import onnx

    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )
    proto = onnx.load(str(onnx_path))
    for init in [i for i in proto.graph.initializer if i.name == "log_prior_shift"]:
        proto.graph.initializer.remove(init)  # older exports (see module doc)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(
        trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"
    ):  # TensorRT < 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(proto.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if tensor.name == "pixel_values":
            rest = dims[1:]
            profile.set_shape(
                tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest)
            )
        elif tensor.name == "log_prior_shift":
            fixed = (1, dims[1])
            profile.set_shape(tensor.name, fixed, fixed, fixed)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


__all__ = ["INSTALL_HINT", "build_engine", "require_tensorrt"]
