"""Fuse an :class:`~zoo.Ensemble` into ONE ONNX graph: pixels in, calibrated probabilities out.

Everything a runtime needs is inside the file: all K experts, the mean-of-logits
combination, the prior adjustment, the temperature and the softmax, plus the
expert-disagreement score; the model's full :class:`~zoo.EnsembleConfig` (class names,
preprocessing, temperature, logit prior, class counts), the default prior shift, the
source repo/revision and the ltzoo version travel as ``metadata_props``
(:func:`read_metadata`). A runtime needs only ``onnxruntime`` and ``numpy``.

Graph interface
---------------
inputs
    ``pixel_values``   float32 ``[batch, C, H, W]`` (dynamic batch), preprocessed as
    ``metadata["ltzoo_config"]["preprocess"]`` says.

    ``log_prior_shift`` float32 ``[prior_batch, num_classes]`` with ``prior_batch`` 1 or
    ``batch``: ``log(target prior) - log(prior the logits are calibrated for)``.
    **Required.** The config's default shift (``default_prior``, usually "balanced") is
    ``metadata["default_log_prior_shift"]``; :func:`graph_feed` feeds it when no prior is
    given. (An initializer of the same name would make the input optional, but plain
    onnxruntime then warns on every session that the "initializer appears in graph
    inputs" and is not a constant.)
outputs
    ``probs`` float32 ``[batch, num_classes]`` = ``softmax((mean_k z_k + shift) / T)``;
    ``disagreement`` float32 ``[batch]``: mean pairwise symmetric KL between the
    experts' ``softmax(z_k / T)`` (exactly :func:`zoo.calibration.expert_disagreement`:
    the tail is :class:`zoo.calibration.CalibrationTail`, the same code as eager PyTorch);
    optional ``expert_probs`` float32 ``[K, batch, num_classes]`` =
    ``softmax((z_k + shift) / T)``, each expert calibrated like the ensemble.

Exporter
--------
``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). Compared with the
legacy TorchScript exporter (``dynamo=False``) on 3 x ResNet-32 it gives a graph with
half the nodes (277 vs 517: BatchNorm folded into Conv, no Identity/Constant clutter,
cleaner Slice/Pad for the option-A shortcuts), named dynamic dims, per-node module scopes
(used here to find the calibration tail) and it is the maintained path (the TorchScript
exporter is deprecated). After onnxruntime's own graph optimisation both run at the same
speed; the dynamo exporter is slower to *run* (3-8 s vs 0.6 s per model).

Variants: ``fp16=True`` converts the experts to float16 with onnxruntime's bundled
float16 converter (``onnxruntime.transformers.float16``; no extra package) keeping the
inputs, the outputs and the calibration tail in float32; :func:`quantize_int8` does ORT
static QDQ quantization with calibration images, again keeping the tail in float32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ltzoo.zoo import calibration as cal
from ltzoo.zoo.calibration import PriorSpec
from ltzoo.zoo.ensemble import Ensemble
from ltzoo.zoo.files import atomic_write, staging_dir

INPUT_NAMES = ("pixel_values", "log_prior_shift")
OUTPUT_NAMES = ("probs", "disagreement", "expert_probs")
FORMAT = "ltzoo-fused-ensemble/1"
#: metadata key listing the float32 calibration-tail nodes (kept fp32 by fp16/int8 variants)
TAIL_NODES_KEY = "ltzoo_tail_nodes"
_TAIL_SCOPE = "tail"
#: graphs larger than this keep their weights in a ``.data`` file beside them (protobuf's 2 GB
#: limit; :func:`_save_with_external_data`)
EXTERNAL_DATA_BYTES = 1_900_000_000

#: onnxruntime session settings used by :func:`make_session` (and recorded by benchmarks)
SESSION_SETTINGS = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "execution_mode": "ORT_SEQUENTIAL",
    "intra_op_num_threads": "number of cores (os.cpu_count()) unless given",
    "inter_op_num_threads": 1,
    "log_severity_level": 3,
}


class FusedEnsemble(nn.Module):
    """The whole pixels -> calibrated probabilities path as one module (what gets exported).

    ``forward(pixel_values, log_prior_shift=None) -> (probs, disagreement[, expert_probs])``;
    ``log_prior_shift`` defaults to the model config's default prior shift, shape (1, C).
    """

    default_log_prior_shift: torch.Tensor

    def __init__(self, model: Ensemble, expert_outputs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.expert_outputs = expert_outputs
        self.tail = cal.CalibrationTail(model.config.temperature, expert_outputs)
        self.register_buffer(
            "default_log_prior_shift", model.prior_shift().float()[None], persistent=False
        )

    def forward(
        self, pixel_values: torch.Tensor, log_prior_shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        shift = self.default_log_prior_shift if log_prior_shift is None else log_prior_shift
        expert_logits = self.model.expert_logits(pixel_values).float()
        return self.tail(expert_logits, shift.float())


# -- metadata -------------------------------------------------------------------------------
def _ltzoo_version() -> str:
    try:
        from importlib.metadata import version

        return version("ltzoo")
    except Exception:  # not installed (e.g. a source checkout on sys.path)
        from ltzoo import __version__

        return __version__


def _set_metadata(proto: Any, entries: dict[str, Any]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, text


def read_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """The file's ``metadata_props`` with JSON values decoded.

    Keys: ``ltzoo_config`` (EnsembleConfig dict), ``default_log_prior_shift`` (list of C
    floats), ``source`` ({"repo_id", "revision"} or {}), ``ltzoo_version``, ``precision``
    ("fp32", "fp16", "int8"), ``prior_input`` ("required"), ``expert_outputs``,
    ``input_names``, ``output_names``, ``format``, ``exporter``, ``torch_version``, ``opset``.
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    return out


# -- export ---------------------------------------------------------------------------------
def _tail_nodes(proto: Any) -> list[str]:
    """Names of the nodes the exporter scoped under ``FusedEnsemble.tail``."""
    names = []
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes" and _TAIL_SCOPE in json.loads(
                prop.value.replace("'", '"')
            ):
                names.append(node.name)
    return names


def _finalise_graph(proto: Any, expert_outputs: bool) -> None:
    """Named dims, the prior an input without initializer, no per-node debug metadata."""
    graph = proto.graph
    for inp in graph.input:
        if inp.name == "log_prior_shift":
            inp.type.tensor_type.shape.dim[0].ClearField("dim_value")
            inp.type.tensor_type.shape.dim[0].dim_param = "prior_batch"
        if inp.name == "pixel_values":
            inp.type.tensor_type.shape.dim[0].dim_param = "batch"
    for old in [i for i in graph.initializer if i.name == "log_prior_shift"]:
        graph.initializer.remove(old)  # an exporter's constant would make ORT warn (see above)
    # intermediate value_info may carry prior_batch == 1 from tracing: let ORT re-infer it
    del graph.value_info[:]
    for node in graph.node:
        del node.metadata_props[:]
    for out in graph.output:
        dims = out.type.tensor_type.shape.dim
        batch_axis = 1 if out.name == "expert_probs" else 0
        if len(dims) > batch_axis:
            dims[batch_axis].ClearField("dim_value")
            dims[batch_axis].dim_param = "batch"


def _toposort(graph: Any) -> None:
    """Sort ``graph.node`` topologically in place (the fp16 converter appends its Casts)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    nodes = [copy.deepcopy(n) for n in ordered]
    del graph.node[:]
    graph.node.extend(nodes)


def _to_fp16(proto: Any, tail: Sequence[str]) -> Any:
    """Experts in float16; inputs, outputs and the calibration tail stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    outputs = [o.name for o in proto.graph.output]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(
            proto, keep_io_types=True, node_block_list=list(tail), disable_shape_infer=False
        )
    _toposort(converted.graph)
    # The converter keeps graph I/O fp32 by renaming and adding Casts; make sure every
    # output (there are 2-3, some produced by blocked nodes) is still float32 under its name.
    got = {o.name: o.type.tensor_type.elem_type for o in converted.graph.output}
    from onnx import TensorProto

    for name in outputs:
        if got.get(name) != TensorProto.FLOAT:
            raise RuntimeError(f"fp16 conversion changed output {name!r} (type {got.get(name)})")
    return converted


def convert_fp16(onnx_path: str | Path, out_path: str | Path) -> Path:
    """float16 copy of an fp32 export (experts fp16; I/O and calibration tail fp32)."""
    import onnx

    proto = onnx.load(str(onnx_path))
    meta = read_metadata(onnx_path)
    if meta.get("precision", "fp32") != "fp32":
        raise ValueError(
            f"convert_fp16 needs an fp32 export, {onnx_path} is {meta.get('precision')}"
        )
    proto = _to_fp16(proto, meta.get(TAIL_NODES_KEY, []))
    _set_metadata(proto, {"precision": "fp16"})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(out_path))
    return Path(out_path)


def export_onnx(
    model: Ensemble,
    path: str | Path,
    *,
    opset: int = 18,
    expert_outputs: bool = False,
    fp16: bool = False,
    source: dict | None = None,
) -> Path:
    """Export ``model`` as one fused ONNX graph (see the module docstring) and return its path.

    The file passes ``onnx.checker`` (full check) before it is written. ``source``
    ({"repo_id", "revision"}) defaults to ``model.config.extra["source"]`` when present.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    fused = FusedEnsemble(model, expert_outputs=expert_outputs).eval()
    cfg = model.config
    c, (h, w) = cfg.preprocess.channels, cfg.preprocess.input_size
    example = (torch.zeros(2, c, h, w), fused.default_log_prior_shift.clone())
    names_out = list(OUTPUT_NAMES[: 3 if expert_outputs else 2])
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            fused,
            example,
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=names_out,
            dynamic_shapes=({0: batch}, None),
            external_data=False,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    tail = _tail_nodes(proto)
    default_shift = fused.default_log_prior_shift.numpy()
    _finalise_graph(proto, expert_outputs)
    if fp16:
        proto = _to_fp16(proto, tail)
    src = source if source is not None else cfg.extra.get("source", {})
    proto.producer_name, proto.producer_version = "ltzoo", _ltzoo_version()
    proto.doc_string = (
        f"ltzoo fused ensemble {cfg.name or cfg.backbone}: {cfg.num_experts} experts -> "
        "mean logits -> + log_prior_shift -> / T -> softmax"
    )
    _set_metadata(
        proto,
        {
            "format": FORMAT,
            "ltzoo_config": cfg.to_dict(),
            "default_log_prior_shift": [float(v) for v in default_shift[0]],
            "source": dict(src or {}),
            "ltzoo_version": _ltzoo_version(),
            "torch_version": torch.__version__,
            "exporter": "torch.onnx.export(dynamo=True)",
            "opset": opset,
            "precision": "fp16" if fp16 else "fp32",
            "prior_input": "required",
            "expert_outputs": expert_outputs,
            "input_names": list(INPUT_NAMES),
            "output_names": names_out,
            TAIL_NODES_KEY: tail,
        },
    )
    onnx.checker.check_model(proto, full_check=True)
    # atomic either way, so a killed export (or two servers filling one cache) leaves no torn file
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:
        _save_with_external_data(proto, path)
    else:
        atomic_write(path, proto.SerializeToString())
    return path


def _save_with_external_data(proto: Any, path: Path) -> None:
    """Save ``proto`` with its weights in ``<name>.<digest>.data`` beside ``path``.

    Both are written in a private folder, then renamed into place, the data first. The data
    file is named after what it holds (every tensor, in order, and the onnx version that lays
    them out), so it never replaces the file an older graph at ``path`` names: a kill between
    the renames leaves the old graph with its own data (and an unused file, removed by the
    next export), never a graph paired with another export's weights."""
    import onnx

    digest = hashlib.sha256(onnx.__version__.encode())
    for tensor in _all_tensors(proto.graph):  # each under 2 GB, unlike the whole graph
        digest.update(tensor.SerializeToString())
    data = f"{path.name}.{digest.hexdigest()[:16]}.data"
    with staging_dir(path) as tmp:
        staged = tmp / path.name
        onnx.save(proto, str(staged), save_as_external_data=True, location=data)
        os.replace(staged.with_name(data), path.with_name(data))
        os.replace(staged, path)
    ours = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{16})?\.data")  # and the unhashed name
    for old in path.parent.iterdir():
        if old.name != data and ours.fullmatch(old.name):  # an earlier export's, a killed one's
            old.unlink(missing_ok=True)


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor ``graph`` holds, those of its nodes' attributes and subgraphs included:
    all that ``onnx.save(save_as_external_data=True)`` may move to the data file."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(sub)


# -- runtime helpers ------------------------------------------------------------------------
def make_session(
    onnx_path: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[Any] | None = None,
    profile_prefix: str | None = None,
) -> Any:
    """An onnxruntime session with the tuned settings of :data:`SESSION_SETTINGS`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(
        str(onnx_path), so, providers=list(providers or ["CPUExecutionProvider"])
    )


def default_prior_shift(session: Any) -> np.ndarray:
    """float32 (1, C): the graph's default ``log_prior_shift`` (its config's default prior),
    from the metadata of an onnxruntime session on a fused export."""
    meta = session.get_modelmeta().custom_metadata_map
    return np.asarray(json.loads(meta["default_log_prior_shift"]), dtype=np.float32)[None]


def graph_feed(
    session: Any, pixel_values: np.ndarray, log_prior_shift: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The inputs of a fused export: ``pixel_values`` and ``log_prior_shift`` (a required
    input; None feeds the graph's default, :func:`default_prior_shift`)."""
    shift = default_prior_shift(session) if log_prior_shift is None else log_prior_shift
    return {
        "pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32),
        "log_prior_shift": np.ascontiguousarray(shift, dtype=np.float32),
    }


_SESSIONS: dict[tuple[str, int, int], Any] = {}


def _cached_session(path: Path) -> Any:
    """One session per file version (repeated parity checks skip session creation)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SESSIONS:
        if len(_SESSIONS) >= 8:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = make_session(path)
    return _SESSIONS[key]


def _shift_feed(model: Ensemble, prior: PriorSpec) -> np.ndarray | None:
    """The ``log_prior_shift`` feed for ``prior``: (1, C), or (B, C) for a (B, C) prior batch."""
    if prior is None:
        return None
    if cal.is_estimate(prior):
        raise ValueError(
            "prior='estimate' is a runtime EM loop, not part of the graph; pass a prior vector"
        )
    if isinstance(prior, torch.Tensor) and prior.ndim == 2:  # already a (B, C) batch of priors
        return np.stack([model.prior_shift(row).numpy() for row in prior]).astype(np.float32)
    return model.prior_shift(prior).numpy()[None].astype(np.float32)


def check_parity(
    model: Ensemble, onnx_path: str | Path, x: torch.Tensor, prior: PriorSpec = None
) -> float:
    """max |p_onnx - p_torch| of the calibrated probabilities for batch ``x``.

    ``prior`` is anything :meth:`zoo.Ensemble.prior_shift` accepts (fed through
    ``log_prior_shift``) or a (B, C) tensor of per-image priors; None feeds the graph's
    default shift.
    """
    model = model.eval()
    sess = _cached_session(Path(onnx_path))
    shift = _shift_feed(model, prior)
    probs = sess.run(["probs"], graph_feed(sess, x.detach().cpu().float().numpy(), shift))[0]
    with torch.inference_mode():
        device = next(model.parameters()).device
        logits = model(x.to(device)).float().cpu()
        ref_shift = model.prior_shift() if shift is None else torch.from_numpy(shift)
        ref = cal.calibrated_probs(logits, ref_shift, model.config.temperature)
    return float(np.abs(probs - ref.numpy()).max())


def compare_predictions(
    model: Ensemble, onnx_path: str | Path, x: torch.Tensor, batch_size: int = 64
) -> dict[str, float]:
    """How an exported graph's calibrated probabilities compare with ``model``'s on images
    ``x`` (N, C, H, W), at the graph's default prior: ``top1_agreement`` (fraction of images
    whose argmax matches) and ``max_diff`` / ``mean_diff`` (of |p_onnx - p_torch|).

    On real images this is the verdict for a quantized graph; random inputs say little
    there (INT8 ranges are calibrated on real images, so noise falls outside them)."""
    model = model.eval()
    sess = _cached_session(Path(onnx_path))
    agree, max_diff, total_diff, n = 0, 0.0, 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        feed = graph_feed(sess, xb.detach().cpu().float().numpy())
        probs = torch.from_numpy(sess.run(["probs"], feed)[0])
        with torch.inference_mode():
            device = next(model.parameters()).device
            logits = model(xb.to(device)).float().cpu()
            ref = cal.calibrated_probs(logits, model.prior_shift(), model.config.temperature)
        diff = (probs - ref).abs()
        agree += int((probs.argmax(1) == ref.argmax(1)).sum())
        max_diff = max(max_diff, float(diff.max()))
        total_diff += float(diff.max(1).values.sum())
        n += len(xb)
    return {"top1_agreement": agree / n, "max_diff": max_diff, "mean_diff": total_diff / n, "n": n}


# -- INT8 -----------------------------------------------------------------------------------
class _ImageReader:
    """onnxruntime CalibrationDataReader over a tensor/array of calibration images, fed with
    the graph's default prior ``shift`` (1, C)."""

    def __init__(self, images: np.ndarray, shift: np.ndarray, batch_size: int = 16) -> None:
        self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self.shift = shift
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {"pixel_values": self.batches[self.pos - 1], "log_prior_shift": self.shift}

    def rewind(self) -> None:
        self.pos = 0


def _as_images(calib_images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Calibration images as a float32 numpy array."""
    if isinstance(calib_images, torch.Tensor):
        calib_images = calib_images.detach().cpu().numpy()
    return np.asarray(calib_images, dtype=np.float32)


def _descendants(graph: Any, roots: Iterable[str]) -> set[str]:
    """Names of ``roots`` and every node downstream of them."""
    by_name = {n.name: n for n in graph.node}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen: set[str] = set()
    stack = [by_name[r] for r in roots if r in by_name]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for out in node.output:
            stack.extend(consumers.get(out, []))
    return seen


@dataclass(frozen=True)
class Int8Form:
    """How :func:`quantize_int8` quantizes: graph format, weight granularity, integer types.

    ``qdq``: QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into QLinearConv
    etc. at session creation; ``qoperator``: QLinear* operators written into the file.
    ``u8s8`` (uint8 activations, int8 weights) is onnxruntime's fast x86 path with
    VNNI; without VNNI its VPMADDUBSW kernel can saturate, which ``reduce_range`` (7-bit
    weights) avoids; ``u8u8`` is the other x86 kernel.
    """

    quant_format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    weights: Literal["s8", "u8"] = "s8"
    reduce_range: bool = False


#: the forms ``ltzoo export --int8`` measures on the machine it runs on (fastest correct wins)
INT8_FORMS: dict[str, Int8Form] = {
    "qdq-u8s8-channel": Int8Form(),
    "qdq-u8s8-tensor": Int8Form(per_channel=False),
    "qoperator-u8s8-channel": Int8Form(quant_format="qoperator"),
    "qdq-u8u8-channel": Int8Form(weights="u8"),
    "qdq-u8s8-channel-reduced": Int8Form(reduce_range=True),
}


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calib_images: torch.Tensor | np.ndarray,
    *,
    form: Int8Form | str = "qdq-u8s8-channel",
) -> Path:
    """Static INT8 quantization in ``form`` (an :data:`INT8_FORMS` name or an
    :class:`Int8Form`) calibrated on ``calib_images``.

    ``calib_images`` are preprocessed ``(N, C, H, W)`` images (a few hundred suffice).
    The model is pre-processed with ``quant_pre_process`` (shape inference + ORT graph
    optimisation, which folds BatchNorm) first; the calibration tail (mean, prior shift,
    temperature, softmax, disagreement) stays float32. Metadata is carried over with
    ``precision="int8"`` and the form used. :func:`fastest_int8` picks the form by measuring.
    """
    if isinstance(form, str):
        if form not in INT8_FORMS:
            raise ValueError(f"unknown INT8 form {form!r}; choose from {sorted(INT8_FORMS)}")
        form_name, form = form, INT8_FORMS[form]
    else:
        form_name = next((k for k, v in INT8_FORMS.items() if v == form), "custom")
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(onnx_path)
    if meta.get("precision", "fp32") != "fp32":
        raise ValueError(
            f"quantize_int8 needs an fp32 export, {onnx_path} is {meta.get('precision')}"
        )
    images = _as_images(calib_images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"calib_images must be a non-empty (N, C, H, W) batch, got shape {images.shape}"
        )
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # quantization opens sessions of its own
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # ONNX shape inference only: onnxruntime's symbolic one fails on the broadcast of
            # the (prior_batch, C) prior input against (batch, C) and on the Expand that
            # F.normalize exports, and leaves temporary files in the working directory
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        pre_proto = onnx.load(str(pre))
        tail_roots = [
            n.name for n in pre_proto.graph.node if n.name in set(meta.get(TAIL_NODES_KEY, []))
        ]
        # nodes reading the prior input are in the tail whatever the optimiser renamed
        tail_roots += [n.name for n in pre_proto.graph.node if "log_prior_shift" in n.input]
        exclude = sorted(_descendants(pre_proto.graph, tail_roots))
        quantize_static(
            str(pre),
            str(out_path),
            _ImageReader(images, np.asarray(meta["default_log_prior_shift"], np.float32)[None]),
            quant_format=QuantFormat.QDQ if form.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=form.per_channel,
            reduce_range=form.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if form.weights == "s8" else QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    proto = onnx.load(str(out_path))
    _set_metadata(proto, {k: v for k, v in meta.items()})
    _set_metadata(
        proto,
        {
            "precision": "int8",
            "int8_calibration_images": len(images),
            "int8_form": form_name,
            "int8_excluded_nodes": exclude,
        },
    )
    names = {i.name for i in proto.graph.input}
    if "log_prior_shift" not in names:
        raise RuntimeError("quantization dropped the log_prior_shift input")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return out_path


def _median_ms(session: Any, x: np.ndarray, min_time: float) -> float:
    feed = graph_feed(session, x)
    session.run(["probs"], feed)  # warm-up (kernel selection, allocations)
    times: list[float] = []
    while sum(times) < min_time or len(times) < 5:
        t0 = time.perf_counter()
        session.run(["probs"], feed)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def fastest_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calib_images: torch.Tensor | np.ndarray,
    *,
    forms: Sequence[str] = tuple(INT8_FORMS),
    batches: Sequence[int] = (1, 8, 32),
    min_agreement: float = 0.99,
    min_time: float = 0.3,
) -> tuple[Path, dict[str, Any]]:
    """Quantize ``onnx_path`` in every form of ``forms``, time each on this machine against
    the fp32 graph, and keep the fastest (geometric mean over ``batches``) whose top-1 agrees
    with fp32 on ``min_agreement`` of the calibration images. INT8 speed depends on the CPU
    (VNNI or not, AVX2 vs AVX-512), so the choice is measured, not assumed.

    Returns the written path and a report (per form: ms per batch, agreement, speed-up
    vs fp32) that is also stored in the file's metadata as ``int8_selection``.
    """
    import onnx

    images = _as_images(calib_images)
    inputs = {b: images[np.arange(b) % len(images)] for b in batches}
    fp32 = make_session(onnx_path)
    fp32_ms = {b: _median_ms(fp32, x, min_time) for b, x in inputs.items()}
    fp32_top1 = fp32.run(["probs"], graph_feed(fp32, images))[0].argmax(1)
    report: dict[str, Any] = {"fp32_ms": fp32_ms, "forms": {}}
    best: tuple[float, str] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in forms:
            path = quantize_int8(onnx_path, Path(tmp) / f"{name}.onnx", images, form=name)
            sess = make_session(path)
            ms = {b: _median_ms(sess, x, min_time) for b, x in inputs.items()}
            agree = float(
                (sess.run(["probs"], graph_feed(sess, images))[0].argmax(1) == fp32_top1).mean()
            )
            speedup = {b: round(fp32_ms[b] / ms[b], 2) for b in batches}
            report["forms"][name] = {"ms": ms, "top1_agreement": agree, "speedup_vs_fp32": speedup}
            score = float(np.exp(np.mean(np.log(list(ms.values())))))
            if agree >= min_agreement and (best is None or score < best[0]):
                best = (score, name)
        if best is None:
            raise ValueError(
                "no INT8 form agrees with fp32 on "
                f"{min_agreement:.0%} of the calibration images (choose one with --int8-form): "
                f"{ {k: v['top1_agreement'] for k, v in report['forms'].items()} }"
            )
        report["chosen"] = best[1]
        proto = onnx.load(str(Path(tmp) / f"{best[1]}.onnx"))
    _set_metadata(proto, {"int8_selection": report})
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out_path))
    return Path(out_path), report


__all__ = [
    "INPUT_NAMES",
    "INT8_FORMS",
    "OUTPUT_NAMES",
    "SESSION_SETTINGS",
    "FusedEnsemble",
    "Int8Form",
    "check_parity",
    "convert_fp16",
    "default_prior_shift",
    "export_onnx",
    "fastest_int8",
    "graph_feed",
    "make_session",
    "quantize_int8",
    "read_metadata",
]
