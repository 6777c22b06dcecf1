"""Inference backends behind ``ltzoo serve``: one interface, three runtimes.

Every backend takes a preprocessed batch and one log-prior-shift row per image::

    probs, disagreement = backend.predict(batch, log_prior_shift)
    # batch (B, C, H, W) float32, log_prior_shift (B, num_classes) float32
    # probs (B, num_classes) = softmax((mean expert logits + shift) / T); disagreement (B,)

* :class:`TorchBackend` runs a :class:`zoo.Ensemble` (CUDA when asked/available, else CPU).
* :class:`OnnxRuntimeBackend` runs the fused graph written by :func:`export.onnx.export_onnx`
  (CUDA / TensorRT execution providers when the device asks and they exist, else CPU).
* :class:`TensorRTBackend` is the same graph on onnxruntime's TensorRT execution provider,
  strictly: it refuses to start (clear error) without TensorRT and an NVIDIA GPU.

Backends are built inside the inference worker (``LitAPI.setup``); what crosses the process
boundary is a picklable :class:`BackendSpec`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ltzoo.zoo.config import EnsembleConfig

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class Backend(Protocol):
    name: str
    config: EnsembleConfig

    def predict(
        self, batch: np.ndarray, log_prior_shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def info(self) -> dict[str, Any]: ...


def _check_inputs(batch: np.ndarray, shift: np.ndarray, num_classes: int) -> None:
    if batch.ndim != 4 or shift.shape != (batch.shape[0], num_classes):
        raise ValueError(
            f"expected batch (B, C, H, W) and shift (B, {num_classes}); got {batch.shape} and {shift.shape}"
        )


class TorchBackend:
    """A :class:`zoo.Ensemble` in eager PyTorch under ``torch.inference_mode``."""

    name = "torch"

    def __init__(self, model: Any, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        from ltzoo.zoo import Ensemble
        from ltzoo.zoo.hub_io import load

        if threads:
            torch.set_num_threads(int(threads))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for but torch sees no CUDA GPU")
        self.device = torch.device(device)
        self.model = model if isinstance(model, Ensemble) else load(str(model), device=self.device)
        self.model = self.model.to(self.device).eval()
        self.config: EnsembleConfig = self.model.config
        self.temperature = float(self.config.temperature)

    def predict(
        self, batch: np.ndarray, log_prior_shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from ltzoo.zoo.calibration import calibrate

        _check_inputs(batch, log_prior_shift, self.config.num_classes)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            expert_logits = self.model.expert_logits(x).float()
            shift = torch.from_numpy(np.ascontiguousarray(log_prior_shift, dtype=np.float32)).to(
                self.device
            )
            probs, disagreement = calibrate(expert_logits, shift, self.temperature)
            return probs.cpu().numpy(), disagreement.cpu().numpy()

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "backend": self.name,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        }


def _providers_for(device: str, want_tensorrt: bool) -> list[Any]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    device_id = int(device.split(":", 1)[1]) if ":" in device else 0
    providers: list[Any] = []
    if want_tensorrt and "TensorrtExecutionProvider" in available:
        cache = str(cache_dir() / "trt")
        providers.append(
            (
                "TensorrtExecutionProvider",
                {
                    "device_id": device_id,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                },
            )
        )
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    if not providers:
        raise RuntimeError(
            f"device {device!r} asked for but onnxruntime has no CUDA/TensorRT execution provider "
            f"(available: {available}); install onnxruntime-gpu (pip install 'ltzoo[gpu]') or use --device cpu"
        )
    return [*providers, "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """The fused ONNX graph of :mod:`export.onnx` on onnxruntime."""

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        providers: list[Any] | None = None,
    ) -> None:
        from ltzoo.export.onnx import make_session, read_metadata

        self.path = Path(onnx_path)
        meta = read_metadata(self.path)
        if "ltzoo_config" not in meta:
            raise ValueError(
                f"{self.path} has no ltzoo_config metadata: not written by `ltzoo export`"
            )
        self.metadata = meta
        self.config = EnsembleConfig.from_dict(meta["ltzoo_config"])
        self.device = device
        self.session = make_session(
            self.path,
            threads=threads,
            providers=providers or _providers_for(device, want_tensorrt=True),
        )
        # exports before the prior input became required had it as an overridable initializer
        names = {i.name for i in self.session.get_inputs()} | {
            i.name for i in self.session.get_overridable_initializers()
        }
        missing = {"pixel_values", "log_prior_shift"} - names
        if missing:
            raise ValueError(f"{self.path} lacks graph input(s) {sorted(missing)}")
        self._threads = threads

    def predict(
        self, batch: np.ndarray, log_prior_shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        _check_inputs(batch, log_prior_shift, self.config.num_classes)
        return self._run_graph(batch, log_prior_shift)

    def _run_graph(
        self, batch: np.ndarray, log_prior_shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        feed = {
            "pixel_values": np.ascontiguousarray(batch, dtype=np.float32),
            "log_prior_shift": np.ascontiguousarray(log_prior_shift, dtype=np.float32),
        }
        probs, disagreement = self.session.run(["probs", "disagreement"], feed)
        return probs, disagreement

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "backend": self.name,
            "device": self.device,
            "providers": self.session.get_providers(),
            "onnx_file": self.path.name,
            "precision": self.metadata.get("precision", "fp32"),
            "onnxruntime_version": ort.__version__,
            "threads": self._threads,
        }


class TensorRTBackend(OnnxRuntimeBackend):
    """The fused graph on TensorRT (through onnxruntime's TensorRT execution provider).

    TensorRT turns initializers into constants, so in an export whose ``log_prior_shift``
    input has a default initializer (before it became required) the input may be frozen to
    that default there. This backend therefore always feeds the default prior ``s_d`` and
    re-weights on the host, exactly (:func:`zoo.calibration.reweight_probs`)::

        softmax((z + s) / T) = normalise(softmax((z + s_d) / T) * exp((s - s_d) / T))
    """

    name = "tensorrt"

    def __init__(
        self, onnx_path: str | Path, device: str = "cuda", threads: int | None = None
    ) -> None:
        check_tensorrt(device)
        super().__init__(
            onnx_path, device=device, threads=threads, providers=_providers_for(device, True)
        )
        if "TensorrtExecutionProvider" not in self.session.get_providers():
            raise RuntimeError(
                "onnxruntime did not enable the TensorRT execution provider for this graph"
            )
        self._init_reweighting()

    def _init_reweighting(self) -> None:
        default = self.metadata.get("default_log_prior_shift")
        if default is None:
            default = [0.0] * self.config.num_classes
        self.default_shift = np.asarray(default, dtype=np.float64)[None]
        self.temperature = float(self.config.temperature)

    def predict(
        self, batch: np.ndarray, log_prior_shift: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        _check_inputs(batch, log_prior_shift, self.config.num_classes)
        probs, disagreement = self._run_graph(batch, self.default_shift)
        return self.reweight(probs, log_prior_shift), disagreement

    def reweight(self, probs: np.ndarray, log_prior_shift: np.ndarray) -> np.ndarray:
        """The host part: graph probabilities under the default prior -> ``log_prior_shift``."""
        import torch

        from ltzoo.zoo.calibration import reweight_probs

        probs_t, shift_t = (
            torch.from_numpy(np.ascontiguousarray(a)) for a in (probs, log_prior_shift)
        )
        default = torch.from_numpy(self.default_shift)
        weighted = reweight_probs(probs_t, shift_t, default, self.temperature)
        return weighted.float().numpy()


def check_tensorrt(device: str) -> None:
    """Raise a RuntimeError saying what is missing for the TensorRT backend."""
    problems = []
    if not device.startswith("cuda"):
        problems.append(
            f"the tensorrt backend runs on a GPU, not on device {device!r} (use --device cuda)"
        )
    try:
        import onnxruntime as ort

        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            problems.append(
                "onnxruntime has no TensorrtExecutionProvider (install onnxruntime-gpu and tensorrt: "
                "pip install 'ltzoo[gpu]')"
            )
    except ImportError:
        problems.append("onnxruntime is not installed")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        problems.append("the tensorrt Python package is not installed")
    if not cuda_available():
        problems.append("no NVIDIA GPU is visible")
    if problems:
        raise RuntimeError("tensorrt backend unavailable: " + "; ".join(problems))


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_device(device: str, backend: str) -> str:
    """``auto`` -> ``cuda`` when a GPU (and, for ORT, its provider) is usable, else ``cpu``."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device != "auto":
        if device.startswith("cuda") and backend != "tensorrt":
            _check_cuda(device, backend)
        return device
    if backend == "tensorrt":
        return "cuda"
    if not cuda_available():
        return "cpu"
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return "cuda"


def _check_cuda(device: str, backend: str) -> None:
    """Raise a one-line RuntimeError when ``device`` (cuda[:N]) cannot run ``backend``."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return
        raise RuntimeError(
            f"device {device!r} asked for but onnxruntime has no CUDAExecutionProvider; "
            "install onnxruntime-gpu (pip install 'ltzoo[gpu]') or use --device cpu"
        )
    if not cuda_available():
        raise RuntimeError(
            f"device {device!r} asked for but no CUDA GPU is visible; use --device cpu"
        )


def cache_dir() -> Path:
    """Where exported graphs are cached (``$LTZOO_CACHE`` or ``~/.cache/ltzoo``)."""
    root = os.environ.get("LTZOO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ltzoo"
    )
    return Path(root)


def export_cached(model: Any) -> Path:
    """Export ``model`` (a zoo.Ensemble) to a fused ONNX file in the cache, keyed by content."""
    import json

    from ltzoo.export.onnx import export_onnx

    digest = model.weights_digest(
        hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    )
    path = (
        cache_dir()
        / "onnx"
        / f"{model.config.name or model.config.backbone}-{digest.hexdigest()[:16]}.onnx"
    )
    if not path.is_file():
        export_onnx(model, path)
    return path


@dataclass
class BackendSpec:
    """What a worker needs to build its backend (picklable, no loaded weights)."""

    kind: str  # torch | onnxruntime | tensorrt
    source: str  # model directory / registry name / Hub id (torch) or .onnx path
    device: str = "cpu"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, device: str | None = None) -> Backend:
        dev = device or self.device
        if self.kind == "torch":
            return TorchBackend(self.source, dev, self.threads)
        if self.kind == "onnxruntime":
            return OnnxRuntimeBackend(self.source, dev, self.threads)
        if self.kind == "tensorrt":
            return TensorRTBackend(self.source, dev, self.threads)
        raise ValueError(f"unknown backend {self.kind!r}; choose from {BACKENDS}")


def prepare(
    model_or_onnx: str, backend: str = "torch", device: str = "auto", threads: int | None = None
):
    """Resolve what to serve in the main process: ``(BackendSpec, EnsembleConfig)``.

    Loads the config (and, for ONNX backends given a model rather than an ``.onnx`` file,
    exports the fused graph once into the cache) so that workers only load.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    device = resolve_device(device, backend)
    if backend == "tensorrt":
        check_tensorrt(device)
    is_onnx = str(model_or_onnx).endswith(".onnx")
    if is_onnx:
        if not Path(model_or_onnx).is_file():
            raise FileNotFoundError(f"{model_or_onnx} does not exist")
        if backend == "torch":
            raise ValueError(
                "the torch backend needs a model directory or name, not an .onnx file; "
                "use --backend onnxruntime"
            )
        from ltzoo.export.onnx import read_metadata

        meta = read_metadata(model_or_onnx)
        if "ltzoo_config" not in meta:
            raise ValueError(
                f"{model_or_onnx} has no ltzoo_config metadata: not written by `ltzoo export`"
            )
        config = EnsembleConfig.from_dict(meta["ltzoo_config"])
        config.extra.setdefault("source", meta.get("source") or {})
        return BackendSpec(backend, str(Path(model_or_onnx).resolve()), device, threads), config
    from ltzoo.zoo.hub_io import load

    model = load(model_or_onnx)
    source = str(Path(model_or_onnx).resolve()) if Path(model_or_onnx).is_dir() else model_or_onnx
    if backend == "torch":
        return BackendSpec("torch", source, device, threads), model.config
    path = export_cached(model)
    return BackendSpec(backend, str(path), device, threads), model.config
