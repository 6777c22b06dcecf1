"""Request decoding and validation for ``POST /predict``.

Two stages, both in the HTTP (uvicorn) process, before anything is queued to the worker
(``serve.api.frame_request``, the FastAPI dependency of LitServe's /predict route):

1. :func:`read_payload` only frames the body: enforces the payload limit (413) and the
   read timeout (408), checks the content type (415), parses JSON or multipart (400 when
   malformed) and produces a plain dict.
2. :class:`RequestDecoder` (on the ``DecodePool`` threads) validates every field (422),
   decodes base64 (400) and images (400 / 413 for decompression bombs) and preprocesses
   them with the model's own :class:`zoo.preprocess.Preprocess`, so the batched
   ``predict`` only sees valid tensors.

Every failure is a :class:`fastapi.HTTPException` whose ``detail`` is a JSON object
``{"error": CODE, "message": TEXT, "field": NAME | None}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from ltzoo.zoo import calibration as cal
from ltzoo.zoo.config import EnsembleConfig
from ltzoo.zoo.preprocess import Preprocess

#: image formats the server agrees to decode (everything else is "not an image")
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
#: JSON keys understood by /predict; anything else is rejected with 422 (catches typos).
JSON_KEYS = frozenset({"image", "images", "top_k", "prior"})
FORM_FILE_KEYS = frozenset({"file", "files"})
FORM_OPTION_KEYS = frozenset({"top_k", "prior"})
DEFAULT_TOP_K = 5
#: widest accepted side ratio: a 1 x 25,000,000 strip would be upscaled to ~800 M pixels by
#: the model's shorter-side resize before cropping
MAX_ASPECT_RATIO = 100
#: PIL refuses to open images above twice ``Image.MAX_IMAGE_PIXELS`` whatever we ask
PIL_PIXEL_CEILING = 2 * (Image.MAX_IMAGE_PIXELS or 0)
_TOP_K_TEXT = re.compile(r"\s*[+-]?[0-9]{1,9}\s*", re.ASCII)  # ASCII digits only (not "٣")


#: JSON schema of every error body
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "type": "object",
            "required": ["error", "message", "field"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
            },
        }
    },
}


def predict_request_body(num_classes: int, max_images: int) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of /predict, from the constants :class:`RequestDecoder` checks."""
    b64_image = {"type": "string", "format": "byte", "minLength": 1, "description": "base64 image"}
    top_k = {"type": "integer", "minimum": 1, "maximum": num_classes, "default": DEFAULT_TOP_K}
    prior = {
        "oneOf": [
            {"type": "string", "enum": ["balanced", "train"]},
            {
                "type": "array",
                "items": {"type": "number", "minimum": 0},
                "minItems": num_classes,
                "maxItems": num_classes,
            },
        ],
        "description": "target class prior: a name or one non-negative weight per class",
    }
    images = {"type": "array", "items": b64_image, "minItems": 1, "maxItems": max_images}
    options = {"top_k": top_k, "prior": prior}
    json_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"image": b64_image, "images": images, **options},
        "oneOf": [{"required": ["image"]}, {"required": ["images"]}],
    }
    form_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "files": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "minItems": 1,
                "maxItems": max_images,
            },
            "top_k": {"type": "string", "pattern": "^[0-9]{1,9}$", "description": "an integer"},
            "prior": {"type": "string", "description": "balanced, train or a JSON list"},
        },
        "oneOf": [{"required": ["file"]}, {"required": ["files"]}],
    }
    return {
        "required": True,
        "content": {
            "application/json": {"schema": json_schema},
            "multipart/form-data": {"schema": form_schema},
        },
    }


def request_error(status: int, code: str, message: str, field: str | None = None) -> HTTPException:
    """An HTTPException whose JSON detail says what is wrong."""
    return HTTPException(
        status_code=status, detail={"error": code, "message": message, "field": field}
    )


# -- stage 1: HTTP framing (uvicorn process) -----------------------------------------------


async def _read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise request_error(
                413,
                "payload_too_large",
                f"request body is larger than the server's limit of {limit} bytes",
            )
        parts.append(chunk)
    return b"".join(parts)


async def _replay(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body
    yield b""


async def read_payload(
    request: Any, max_bytes: int, max_images: int, read_timeout: float | None = None
) -> dict[str, Any]:
    """Read and frame a /predict body into ``{"kind": "json"|"form", "data": ...}``.

    A body not received in full within ``read_timeout`` seconds gets a 408 (and the
    connection is closed, since its body was not read to the end).

    ``request`` is a Starlette request. JSON bodies become ``data = <parsed JSON>``; multipart
    bodies become ``data = {"file": [bytes...], "files": [...], "top_k": [str...], ...}``
    (every value a list, files as bytes, other fields as text).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_len = int(declared)
        except ValueError:
            raise request_error(
                400, "bad_content_length", "Content-Length is not an integer"
            ) from None
        if declared_len > max_bytes:
            raise request_error(
                413,
                "payload_too_large",
                f"request body is {declared_len} bytes, more than the server's limit of {max_bytes} bytes",
            )
    try:
        body = await asyncio.wait_for(_read_limited(request.stream(), max_bytes), read_timeout)
    except TimeoutError:
        exc = request_error(
            408, "read_timeout", f"request body not received within {read_timeout:g} s"
        )
        exc.headers = {"Connection": "close"}  # drop the connection, not only the request
        raise exc from None
    if not body:
        raise request_error(
            400, "empty_body", "request body is empty; send JSON or a multipart image upload"
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("", "application/json") or content_type.endswith("+json"):
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # also ints over Python's 4300-digit limit
            raise request_error(
                400, "malformed_json", f"request body is not valid JSON: {exc}"[:300]
            ) from None
        return {"kind": "json", "data": data}
    if content_type == "multipart/form-data":
        return {"kind": "form", "data": await _parse_multipart(request.headers, body, max_images)}
    raise request_error(
        415,
        "unsupported_media_type",
        f"unsupported Content-Type {content_type!r}; use application/json or multipart/form-data",
    )


async def _parse_multipart(headers: Any, body: bytes, max_images: int) -> dict[str, list[Any]]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    parser = MultiPartParser(
        headers, _replay(body), max_files=max_images, max_fields=16, max_part_size=64 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "too many files" in exc.message.lower():
            raise request_error(
                413,
                "too_many_images",
                f"more than the limit of {max_images} images in one request",
                "files",
            ) from None
        raise request_error(
            400, "malformed_multipart", f"multipart body is malformed: {exc.message}"
        ) from None
    except Exception as exc:  # python-multipart raises several types on garbage
        raise request_error(
            400, "malformed_multipart", f"multipart body is malformed: {exc}"
        ) from None
    fields: dict[str, list[Any]] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                fields.setdefault(key, []).append(await value.read())
            else:
                fields.setdefault(key, []).append(str(value))
    finally:
        await form.close()
    return fields


# -- stage 2: validation and decoding (inference worker) -------------------------------------


@dataclass(repr=False)
class DecodedRequest:
    """One valid /predict request, ready to be batched."""

    pixels: np.ndarray  # (N, C, H, W) float32
    shift: np.ndarray  # (N, C) float32 log prior shift, one row per image
    top_k: int
    multi: bool  # answer with a list (``images``/``files``) or a single object

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])

    def __repr__(self) -> str:  # LitServe logs every request: no array printing (~1 ms)
        return f"DecodedRequest({self.count} images, top_k={self.top_k}, multi={self.multi})"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RequestDecoder:
    """Validates a framed payload and turns it into a :class:`DecodedRequest`.

    Limits: ``max_pixels`` per image, ``max_request_pixels`` summed over the images of one
    request (default ``2 * max_pixels``), ``max_images`` per request. All sizes are read
    from the image headers and checked before any pixel is decoded.
    """

    def __init__(
        self,
        config: EnsembleConfig,
        max_pixels: int,
        max_images: int,
        max_request_pixels: int | None = None,
    ) -> None:
        self.config = config
        self.num_classes = config.num_classes
        self.max_pixels = int(max_pixels)
        self.max_images = int(max_images)
        self.max_request_pixels = int(max_request_pixels or 2 * self.max_pixels)
        self.preprocess = Preprocess(config.preprocess)
        self._named_shifts: dict[str, np.ndarray] = {}
        for name in ("balanced", "train"):
            # "train" without class counts is reported per request instead
            with contextlib.suppress(ValueError):
                self._named_shifts[name] = self._shift_of(name)

    # -- options ---------------------------------------------------------------------------
    def _shift_of(self, spec: Any) -> np.ndarray:
        """The model's log-prior shift for ``spec``, from :func:`zoo.calibration.log_prior_shift`."""
        return cal.log_prior_shift(self.config, spec).numpy()

    def parse_top_k(self, value: Any, from_form: bool) -> int:
        c = self.num_classes
        if value is None:
            return min(DEFAULT_TOP_K, c)
        if from_form:
            if not _TOP_K_TEXT.fullmatch(value):
                raise request_error(
                    422,
                    "invalid_top_k",
                    f"top_k must be an integer in [1, {c}], got {value!r}",
                    "top_k",
                )
            value = int(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise request_error(
                422,
                "invalid_top_k",
                f"top_k must be an integer in [1, {c}], got {type(value).__name__} {value!r}",
                "top_k",
            )
        if not 1 <= value <= c:
            raise request_error(
                422, "invalid_top_k", f"top_k must be in [1, {c}], got {value}", "top_k"
            )
        return int(value)

    def parse_prior(self, value: Any, from_form: bool) -> np.ndarray:
        c = self.num_classes
        value = cal.requested_prior(self.config, value)
        if from_form and isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise request_error(
                    422, "invalid_prior", "prior form field is not a valid JSON list", "prior"
                ) from None
        if isinstance(value, str):
            if value in self._named_shifts:
                return self._named_shifts[value]
            try:
                return self._shift_of(value)  # raises with the reason (unknown name, no counts)
            except ValueError as exc:
                raise request_error(422, "invalid_prior", str(exc), "prior") from None
        if not isinstance(value, list):
            raise request_error(
                422,
                "invalid_prior",
                f"prior must be 'balanced', 'train' or a list of {c} numbers, got {type(value).__name__}",
                "prior",
            )
        if len(value) != c:
            raise request_error(
                422, "invalid_prior", f"prior must have {c} entries, got {len(value)}", "prior"
            )
        if not all(_is_number(v) for v in value):
            raise request_error(
                422,
                "invalid_prior",
                f"prior entries must all be numbers, got {value!r}"[:300],
                "prior",
            )
        try:
            floats = [float(v) for v in value]
        except OverflowError:  # a 400-digit integer
            raise request_error(
                422, "invalid_prior", "prior contains a number too large for a float", "prior"
            ) from None
        if not all(math.isfinite(v) for v in floats):
            raise request_error(
                422, "invalid_prior", "prior contains NaN or infinite values", "prior"
            )
        try:
            return self._shift_of(floats)
        except ValueError as exc:  # negative entries, zero sum
            raise request_error(422, "invalid_prior", str(exc), "prior") from None

    # -- images ----------------------------------------------------------------------------
    def decode_base64(self, value: Any, field: str) -> bytes:
        if not isinstance(value, str):
            raise request_error(
                422,
                "invalid_type",
                f"{field} must be a base64 string, got {type(value).__name__}",
                field,
            )
        text = value.strip()
        if text.startswith("data:"):
            head, sep, text = text.partition(",")
            if not sep or ";base64" not in head:
                raise request_error(
                    400, "invalid_base64", f"{field} is a data URI without base64 content", field
                )
        text = re.sub(r"\s+", "", text)
        if not text:
            raise request_error(400, "empty_image", f"{field} is an empty string", field)
        altchars = b"-_" if ("-" in text or "_" in text) else None
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise request_error(
                400, "invalid_base64", f"{field} is not valid base64: {exc}", field
            ) from None
        return data

    @contextlib.contextmanager
    def _image_errors(self, field: str) -> Iterator[None]:
        """Map PIL's failures on ``field`` to 4xx errors (HTTPExceptions pass through).

        The pixel budget is checked from the header (:meth:`open_image`), so no process-global
        PIL or ``warnings`` state is changed (images are decoded on several threads); PIL's own
        refusal above :data:`PIL_PIXEL_CEILING` still maps to 413.
        """
        try:
            yield
        except HTTPException:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # (-W error)
            raise request_error(
                413,
                "image_too_large",
                f"{field} has more pixels than the server's limit of {self.max_pixels} "
                "(--max-pixels)",
                field,
            ) from None
        except UnidentifiedImageError:
            raise request_error(
                400,
                "not_an_image",
                f"{field} is not a supported image (accepted formats: {', '.join(ALLOWED_FORMATS)})",
                field,
            ) from None
        except Exception as exc:  # truncated / corrupt data, unsupported modes, ...
            raise request_error(
                400, "invalid_image", f"{field} could not be decoded: {exc}"[:300], field
            ) from None

    def open_image(self, data: bytes, field: str) -> Image.Image:
        """Read only the header of ``data`` and check its size against the per-image limits."""
        if not data:
            raise request_error(400, "empty_image", f"{field} is empty (0 bytes)", field)
        with self._image_errors(field):
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = image.size
        if width < 1 or height < 1:
            raise request_error(
                400, "invalid_image", f"{field} has an empty size {width}x{height}", field
            )
        if width * height > self.max_pixels:
            raise self._too_big(field, width, height)
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise request_error(
                400,
                "invalid_image",
                f"{field} is {width}x{height}: sides more than {MAX_ASPECT_RATIO}:1 apart",
                field,
            )
        return image

    def to_array(self, image: Image.Image, field: str) -> np.ndarray:
        """Decode an opened image and preprocess it to a (C, H, W) float32 array."""
        with self._image_errors(field):
            self._draft(image)
            image.load()
            return self.preprocess(image).numpy()

    def load_image(self, data: bytes, field: str) -> np.ndarray:
        """Bytes -> preprocessed (C, H, W) float32 array, with the pixel limit checked first."""
        return self.to_array(self.open_image(data, field), field)

    def _too_big(self, field: str, width: int, height: int) -> HTTPException:
        return request_error(
            413,
            "image_too_large",
            f"{field} is {width}x{height} = {width * height} pixels, more than the server's limit of "
            f"{self.max_pixels} (--max-pixels)",
            field,
        )

    def _check_request_pixels(self, images: Sequence[Image.Image], field: str) -> None:
        total = sum(im.width * im.height for im in images)
        if total > self.max_request_pixels:
            raise request_error(
                413,
                "request_too_large",
                f"the images of this request have {total} pixels in all, more than the server's "
                f"limit of {self.max_request_pixels} per request (--max-request-pixels)",
                field,
            )

    def _draft(self, image: Image.Image) -> None:
        """Let JPEG decode at a reduced scale that still leaves >= 2x the model's input size."""
        if image.format != "JPEG":
            return
        side = 2 * max(self.config.preprocess.input_size)
        if min(image.size) >= 2 * side:
            image.draft(image.mode, (side, side))

    # -- whole request -----------------------------------------------------------------------
    def decode(self, payload: Any) -> DecodedRequest:
        if not isinstance(payload, dict) or payload.get("kind") not in ("json", "form"):
            raise request_error(400, "bad_request", "request could not be read")
        if payload["kind"] == "json":
            blobs, multi, top_k, shift = self._from_json(payload["data"])
        else:
            blobs, multi, top_k, shift = self._from_form(payload["data"])
        images = [self.open_image(data, field) for field, data in blobs]
        self._check_request_pixels(images, blobs[0][0].split("[")[0])
        pixels = np.stack([self.to_array(im, f) for im, (f, _) in zip(images, blobs, strict=True)])
        shifts = np.broadcast_to(shift, (len(blobs), self.num_classes)).astype(np.float32)
        return DecodedRequest(pixels.astype(np.float32, copy=False), shifts, top_k, multi)

    def _check_count(self, n: int, field: str) -> None:
        if n == 0:
            raise request_error(422, "no_images", f"{field} must contain at least one image", field)
        if n > self.max_images:
            raise request_error(
                413,
                "too_many_images",
                f"{n} images in one request, more than the limit of {self.max_images}",
                field,
            )

    def _from_json(self, data: Any) -> tuple[list[tuple[str, bytes]], bool, int, np.ndarray]:
        if not isinstance(data, dict):
            raise request_error(
                422, "invalid_body", f"JSON body must be an object, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - JSON_KEYS)
        if unknown:
            raise request_error(
                422,
                "unknown_field",
                f"unknown field(s) {unknown}; allowed: {sorted(JSON_KEYS)}",
                unknown[0],
            )
        if "image" in data and "images" in data:
            raise request_error(
                422, "conflicting_fields", "send either 'image' or 'images', not both", "images"
            )
        top_k = self.parse_top_k(data.get("top_k"), from_form=False)
        shift = self.parse_prior(data.get("prior"), from_form=False)
        if "image" in data:
            return [("image", self.decode_base64(data["image"], "image"))], False, top_k, shift
        if "images" in data:
            items = data["images"]
            if not isinstance(items, list):
                raise request_error(
                    422,
                    "invalid_type",
                    f"images must be a list of base64 strings, got {type(items).__name__}",
                    "images",
                )
            self._check_count(len(items), "images")
            blobs = [
                (f"images[{i}]", self.decode_base64(v, f"images[{i}]")) for i, v in enumerate(items)
            ]
            return blobs, True, top_k, shift
        raise request_error(
            422,
            "missing_field",
            "missing 'image' (base64 string) or 'images' (list of them)",
            "image",
        )

    def _from_form(
        self, fields: dict[str, list[Any]]
    ) -> tuple[list[tuple[str, bytes]], bool, int, np.ndarray]:
        unknown = sorted(set(fields) - FORM_FILE_KEYS - FORM_OPTION_KEYS)
        if unknown:
            allowed = sorted(FORM_FILE_KEYS | FORM_OPTION_KEYS)
            raise request_error(
                422,
                "unknown_field",
                f"unknown form field(s) {unknown}; allowed: {allowed}",
                unknown[0],
            )
        options = {}
        for key in FORM_OPTION_KEYS:
            values = fields.get(key, [])
            if len(values) > 1:
                raise request_error(
                    422, "duplicate_field", f"form field {key!r} given {len(values)} times", key
                )
            if values and not isinstance(values[0], str):
                raise request_error(
                    422, "invalid_type", f"form field {key!r} must be text, not a file", key
                )
            options[key] = values[0] if values else None
        top_k = self.parse_top_k(options["top_k"], from_form=True)
        shift = self.parse_prior(options["prior"], from_form=True)
        present = [k for k in ("file", "files") if k in fields]
        if len(present) == 2:
            raise request_error(
                422, "conflicting_fields", "send either 'file' or 'files', not both", "files"
            )
        if not present:
            raise request_error(
                422, "missing_field", "missing multipart file field 'file' (or 'files')", "file"
            )
        key = present[0]
        values = fields[key]
        if key == "file" and len(values) > 1:
            raise request_error(
                422,
                "duplicate_field",
                "several 'file' parts; use 'files' for several images",
                "file",
            )
        self._check_count(len(values), key)
        blobs = []
        for i, value in enumerate(values):
            name = key if key == "file" else f"files[{i}]"
            if not isinstance(value, bytes):
                raise request_error(
                    422, "invalid_type", f"{name} must be a file upload, not a text field", name
                )
            blobs.append((name, value))
        return blobs, key == "files", top_k, shift


def top_k_predictions(
    probs: np.ndarray, top_k: int, names: Sequence[str], groups: Sequence[str]
) -> list[dict[str, Any]]:
    """Top-k entries of one probability row, highest first."""
    idx = np.argsort(-probs, kind="stable")[:top_k]
    return [
        {"label": names[i], "index": int(i), "probability": float(probs[i]), "group": groups[i]}
        for i in idx
    ]
