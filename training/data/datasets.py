"""Long-tailed dataset builders: Fashion-MNIST-LT, CIFAR-10/100-LT, ImageNet-LT, Places-LT,
iNaturalist 2018 and ImageFolder-LT, all returned as an :class:`LTSplit`.

Label convention: with ``class_order`` (a permutation of the original class ids, head
first), new label ``i`` holds the images of original class ``class_order[i]``, and
``class_names`` / ``class_counts`` are indexed by the new label.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ltzoo.zoo.config import PreprocessConfig
from ltzoo.zoo.datasets_meta import CIFAR_PREPROCESS, DATASETS, IMAGENET_PREPROCESS
from ltzoo.zoo.files import atomic_write
from ltzoo.zoo.preprocess import Preprocess, to_model_mode

from .profile import check_class_order, inverse_order, lt_counts, select_lt

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "dataset-fashion-mnist"
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
NAMES = (
    "fashion_mnist_lt",
    "cifar10_lt",
    "cifar100_lt",
    "imagenet_lt",
    "places_lt",
    "inat2018",
    "imagefolder_lt",
)
#: Default split files (looked up under ``root``): (train, val, test). iNaturalist 2018 has
#: no separate test set; its official val list is the test set and there is no val split.
SPLIT_FILES: dict[str, tuple[str, str | None, str]] = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places_lt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
    "inat2018": ("iNaturalist18_train.txt", None, "iNaturalist18_val.txt"),
}
#: How results on the JPEG re-encoding of CIFAR-10 are labelled (it differs from the arrays
#: the papers used: compare with their tables only under this name).
CIFAR10_JPEG_VARIANT = "CIFAR-10 (JPEG copy)"
DEFAULT_N_MAX = {"fashion_mnist_lt": 1000, "cifar10_lt": 5000, "cifar100_lt": 500}
DEFAULT_RHO = 100.0
#: ImageFolder-LT: a train folder whose smallest class has >= this fraction of the largest
#: class's images counts as balanced, so a given rho turns it long-tailed.
BALANCED_TOLERANCE = 0.9


@dataclass
class LTSplit:
    """A long-tailed training set with validation / test sets (balanced, unless
    ``val_max_per_class`` grows the validation split)."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    class_counts: list[int]
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    train_labels: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------- datasets


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, H, W) or (N, H, W, 3).

    ``__getitem__`` turns image ``i`` into a PIL "L"/"RGB" image and applies ``transform``,
    or, when it is ``None``, the evaluation ``Preprocess(preprocess)`` (default: the
    Fashion-MNIST config for 1-channel images, the CIFAR one for RGB, at the images' size).
    ``indices`` (optional) records where each image came from in the original split.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Iterable[int],
        transform: Callable | None = None,
        indices: Iterable[int] | None = None,
        preprocess: PreprocessConfig | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError("images must be a uint8 tensor (N, H, W) or (N, H, W, 3)")
        self.labels = [int(x) for x in labels]
        if len(images) != len(self.labels):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels")
        self.images = images.contiguous()
        self._np = self.images.numpy()
        self.targets = self.labels
        self.mode = "L" if images.ndim == 3 else "RGB"
        self.transform = transform
        self.indices = None if indices is None else [int(i) for i in indices]
        if preprocess is None:
            base = PreprocessConfig() if self.mode == "L" else PreprocessConfig(**CIFAR_PREPROCESS)
            preprocess = dataclasses.replace(
                base, input_size=(int(images.shape[1]), int(images.shape[2]))
            )
        self.eval_preprocess = Preprocess(preprocess)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self._np[i], mode=self.mode)
        tf = self.transform if self.transform is not None else self.eval_preprocess
        return tf(image), self.labels[i]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_np")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._np = self.images.numpy()


class FileListDataset(Dataset):
    """Images on disk opened lazily; ``samples`` is a list of (path, label).

    Each image is opened with PIL, converted with ``zoo.preprocess.to_model_mode`` and passed
    to ``transform`` (``None``: the evaluation ``Preprocess(preprocess)``, ImageNet's default).
    """

    def __init__(
        self,
        samples: Iterable[tuple[str | Path, int]],
        transform: Callable | None = None,
        channels: int | None = None,
        preprocess: PreprocessConfig | None = None,
    ) -> None:
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.labels = [y for _, y in self.samples]
        self.targets = self.labels
        self.transform = transform
        if preprocess is None:
            preprocess = PreprocessConfig(**IMAGENET_PREPROCESS)
        self.channels = preprocess.channels if channels is None else channels
        self.background = preprocess.background_rgb
        self.eval_preprocess = Preprocess(preprocess)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            image = to_model_mode(im, self.channels, self.background)
        tf = self.transform if self.transform is not None else self.eval_preprocess
        return tf(image), label


# --------------------------------------------------------------------------- helpers


def _default_root() -> str:
    return os.environ.get("LTZOO_DATA_ROOT", "data")


def _eval_default(name: str) -> PreprocessConfig:
    if name in DATASETS:
        return DATASETS[name].preprocess_config()
    return PreprocessConfig(**IMAGENET_PREPROCESS)


def _info(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, **kw}


def _finish_info(info: dict, counts: list[int], train: Any, val: Any | None, test: Any) -> dict:
    info["class_counts"] = list(counts)
    info["counts"] = list(counts)
    info["num_classes"] = len(counts)
    info["sizes"] = {"train": len(train), "val": 0 if val is None else len(val), "test": len(test)}
    return info


@dataclass(frozen=True)
class _Arrays:
    """A dataset read into memory: uint8 images and labels of the official train / test sets,
    where they came from, and ``variant``, which labels a copy that is not the official one
    (recorded in ``info["variant"]``)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    variant: str | None = None


def _lt_from_arrays(
    name: str,
    arrays: _Arrays,
    *,
    rho: float,
    n_max: int,
    seed: int,
    class_order: Sequence[int] | None,
    val_per_class: int,
    train_transform: Callable,
    eval_transform: Callable,
    val_from_train: bool = False,
    val_max_per_class: int = 0,
) -> LTSplit:
    """The one path of the in-memory datasets (Fashion-MNIST, CIFAR): the exponential
    profile of ``rho`` / ``n_max`` over ``arrays``' training set, a val split, the
    official test set."""
    cfg = DATASETS[name].preprocess_config()
    base_names = DATASETS[name].class_names()
    train_images, train_labels = arrays.train_images, arrays.train_labels
    num_classes = len(base_names)
    order = check_class_order(class_order, num_classes)
    tr_idx, tr_lab, va_idx, va_lab, v, counts = select_lt(
        train_labels,
        order,
        lt_counts(n_max, num_classes, rho),
        seed=seed,
        val_per_class=val_per_class,
        dataset=name,
        val_from_train=val_from_train,
        val_max_per_class=val_max_per_class,
    )
    inv = inverse_order(order)
    train = ArrayImageDataset(
        torch.from_numpy(train_images[tr_idx]), tr_lab, train_transform, tr_idx, cfg
    )
    val = (
        ArrayImageDataset(
            torch.from_numpy(train_images[va_idx]), va_lab, eval_transform, va_idx, cfg
        )
        if v
        else None
    )
    test = ArrayImageDataset(
        torch.from_numpy(np.array(arrays.test_images, dtype=np.uint8)),
        inv[np.asarray(arrays.test_labels, dtype=np.int64)],
        eval_transform,
        preprocess=cfg,
    )
    names = [base_names[o] for o in order]
    info = _info(
        name,
        rho=float(rho),
        n_max=int(n_max),
        seed=int(seed),
        class_order=order,
        val_per_class=v,
        source=arrays.source,
    )
    if val_from_train:
        info["val_from_train"] = True
    if val_max_per_class and v:  # what eval / calibrate rebuild the split with
        info["val_max_per_class"] = int(val_max_per_class)
    if arrays.variant:
        info["variant"] = arrays.variant
    return LTSplit(
        train,
        val,
        test,
        counts,
        names,
        _finish_info(info, counts, train, val, test),
        tr_lab.tolist(),
    )


# --------------------------------------------------------------------------- Fashion-MNIST


def _idx_file(root: Path, stem: str) -> Path:
    for cand in (
        root / f"{stem}.gz",
        root / stem,
        root / "FashionMNIST" / "raw" / f"{stem}.gz",
        root / "FashionMNIST" / "raw" / stem,
    ):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found. Install the Debian/Ubuntu "
        f"package '{FASHION_MNIST_APT}' (apt-get install {FASHION_MNIST_APT}; it puts the IDX "
        f"files in {FASHION_MNIST_DIR}) or pass root= a directory holding {stem}.gz"
    )


@lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime: float) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} bytes")
    arr = arr.reshape(shape)
    arr.flags.writeable = False
    return arr


def read_idx(path: str | Path) -> np.ndarray:
    """Read an (optionally gzipped) IDX file of unsigned bytes, e.g. MNIST / Fashion-MNIST."""
    p = Path(path)
    return _read_idx_cached(str(p), p.stat().st_mtime)


def _fashion_mnist(root: str | None) -> _Arrays:
    r = Path(root or FASHION_MNIST_DIR)

    def read(stem: str) -> np.ndarray:
        return read_idx(_idx_file(r, stem))

    return _Arrays(
        train_images=read("train-images-idx3-ubyte"),
        train_labels=read("train-labels-idx1-ubyte"),
        test_images=read("t10k-images-idx3-ubyte"),
        test_labels=read("t10k-labels-idx1-ubyte"),
        source=str(r),
    )


# --------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR file {path} not found: root must hold the official python-version archive "
            "extracted (cifar-10-batches-py/ or cifar-100-python/ from "
            "https://www.cs.toronto.edu/~kriz/cifar.html) or, for CIFAR-10, JPEG class folders "
            "train/<class>/*.jpg and test/<class>/*.jpg (a directory or a .tar.gz of it)"
        )
    # The CIFAR "python version" is a set of pickled dicts of lists, bytes and numpy arrays:
    # read with an unpickler that can build nothing else, so a tampered file cannot run code.
    with open(path, "rb") as f:
        return _DataOnlyUnpickler(f, encoding="bytes").load()


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only; any other global is refused."""

    _ALLOWED = frozenset(
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")  # numpy 1.x / 2.x spell the same functions differently
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    ) | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR archive holds only lists, bytes "
                "and numpy arrays (is this file really from cs.toronto.edu/~kriz/cifar.html?)"
            )
        return super().find_class(module, name)


def _cifar_arrays(d: dict, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), np.asarray(d[label_key], dtype=np.int64)


def _jpeg_members(root: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """``(split, class, file name, bytes)`` of every ``<split>/<class>/*.jpg`` under ``root``:
    a directory, or a ``.tar`` / ``.tar.gz`` holding that tree (optionally under one folder)."""
    if root.is_dir():
        for split in ("train", "test"):
            for path in (root / split).glob("*/*"):
                if path.suffix.lower() in (".jpg", ".jpeg"):
                    yield split, path.parent.name, path.name, path.read_bytes()
        return
    with tarfile.open(root, "r:*") as tar:
        for member in tar:
            parts = member.name.split("/")
            jpeg = Path(parts[-1]).suffix.lower() in (".jpg", ".jpeg")
            if member.isfile() and jpeg and len(parts) >= 3 and parts[-3] in ("train", "test"):
                data = tar.extractfile(member)
                if data is not None:
                    yield parts[-3], parts[-2], parts[-1], data.read()


def _decode_tree(path: Path, classes: tuple[str, ...]) -> dict[str, np.ndarray]:
    from torchvision.io import ImageReadMode, decode_jpeg

    found: dict[str, list[tuple[int, str, bytes]]] = {"train": [], "test": []}
    index = {c: i for i, c in enumerate(classes)}
    for split, cls, fname, data in _jpeg_members(path):
        if cls not in index:
            raise ValueError(
                f"{path}: unknown class folder {split}/{cls}; expected {list(classes)}"
            )
        found[split].append((index[cls], fname, data))
    out = {}
    for split, items in found.items():
        if not items:
            raise FileNotFoundError(f"{path}: no {split}/<class>/*.jpg images")
        items.sort(key=lambda t: (t[0], t[1]))  # file order is not stable across copies
        # libjpeg-turbo through torchvision: the same pixels as PIL, ~3x faster per image
        chw = [
            decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)
            for _, _, d in items
        ]
        out[f"{split}_images"] = torch.stack(chw).permute(0, 2, 3, 1).contiguous().numpy()
        out[f"{split}_labels"] = np.array([y for y, _, _ in items], dtype=np.int64)
    return out


def _dataset_cache_dir() -> Path:
    return Path(os.environ.get("LTZOO_CACHE") or Path.home() / ".cache" / "ltzoo") / "datasets"


@lru_cache(maxsize=2)
def _read_jpeg_tree_cached(
    path: str, mtime: float, size: int, classes: tuple[str, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    key = hashlib.sha256(repr((path, mtime, size, classes)).encode()).hexdigest()[:16]
    cache = _dataset_cache_dir() / f"jpeg-tree-{key}.npz"
    try:
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError):  # no cache yet, or an unreadable one: decode again
        arrays = _decode_tree(Path(path), classes)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
        except OSError as exc:  # a read-only home: keep going without the disk cache
            warnings.warn(f"could not cache decoded images in {cache}: {exc}", stacklevel=3)
    for a in arrays.values():
        a.flags.writeable = False
    return {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in ("train", "test")}


def read_jpeg_tree(
    path: str | Path, classes: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode a JPEG class-folder tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``; a
    directory or a tar of it) into ``{"train": (images, labels), "test": ...}``: uint8
    ``(N, H, W, 3)`` RGB arrays, label = index of the folder name in ``classes``, images sorted
    by (label, file name). Decoded once: cached in memory and on disk (``$LTZOO_CACHE`` or
    ``~/.cache/ltzoo``, under ``datasets/``) per (path, modification time, size)."""
    p = Path(path).resolve()
    st = p.stat()
    return _read_jpeg_tree_cached(str(p), st.st_mtime, st.st_size, tuple(classes))


def is_jpeg_tree(root: Path) -> bool:
    """Whether ``root`` is a JPEG class-folder tree: ``train/`` and ``test/`` folders, or a tar."""
    if root.is_dir():
        return (root / "train").is_dir() and (root / "test").is_dir()
    return root.is_file() and tarfile.is_tarfile(root)


def _cifar(name: str, root: str | None) -> _Arrays:
    r = Path(root or _default_root())
    if name == "cifar10_lt" and is_jpeg_tree(r):
        tree = read_jpeg_tree(r, DATASETS[name].class_names())
        (tr_x, tr_y), (te_x, te_y) = tree["train"], tree["test"]
        return _Arrays(tr_x, tr_y, te_x, te_y, source=str(r), variant=CIFAR10_JPEG_VARIANT)
    if name == "cifar10_lt":
        sub = "cifar-10-batches-py"
        d = r if (r / "data_batch_1").is_file() else r / sub
        parts = [_cifar_arrays(_unpickle(d / f"data_batch_{i}"), b"labels") for i in range(1, 6)]
        tr_x = np.concatenate([p[0] for p in parts])
        tr_y = np.concatenate([p[1] for p in parts])
        te_x, te_y = _cifar_arrays(_unpickle(d / "test_batch"), b"labels")
    else:
        sub = "cifar-100-python"
        d = r if (r / "train").is_file() else r / sub
        tr_x, tr_y = _cifar_arrays(_unpickle(d / "train"), b"fine_labels")
        te_x, te_y = _cifar_arrays(_unpickle(d / "test"), b"fine_labels")
    return _Arrays(tr_x, tr_y, te_x, te_y, source=str(d))


# --------------------------------------------------------------------------- split files


def _resolve(root: Path, f: str) -> Path:
    p = Path(f)
    return p if p.is_absolute() or p.is_file() else root / p


def read_split_file(path: str | Path, what: str = "split") -> list[tuple[str, int]]:
    """Parse ``relative/path.jpg label`` lines (blank lines and ``#`` comments skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} file {p} not found. It should list one image per line as "
            "'relative/path.jpg <integer label>' (paths relative to root, the image directory); "
            "pass root= or the split path (train_split=/val_split=/test_split=)"
        )
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rel, label = line.rsplit(maxsplit=1)
            out.append((rel, int(label)))
        except ValueError:
            raise ValueError(f"{p}:{n}: expected 'relative/path.jpg label', got {line!r}") from None
    if not out:
        raise ValueError(f"{p} lists no images")
    return out


def _names_from_paths(samples: list[tuple[str, int]], num_classes: int) -> list[str]:
    """Class names from the directory of each class's first image (Places-LT, iNat)."""
    first: dict[int, tuple[str, ...]] = {}
    for rel, y in samples:
        first.setdefault(y, Path(rel).parent.parts)
    dirs = [list(first.get(c, ())) for c in range(num_classes)]
    present = [d for d in dirs if d]
    k = 0
    while present and all(len(d) > k + 1 for d in present) and len({d[k] for d in present}) == 1:
        k += 1
    names = []
    for c, d in enumerate(dirs):
        d = d[k:]
        if len(d) > 1 and len(d[0]) == 1:  # Places' alphabetical bucket: a/abbey -> abbey
            d = d[1:]
        names.append("/".join(d) if d else f"class_{c}")
    return names if len(set(names)) == num_classes else [f"class_{c}" for c in range(num_classes)]


def _split_files(name, root, seed, class_order, ttf, etf, splits, cfg) -> LTSplit:
    r = Path(root or _default_root())
    d_train, d_val, d_test = SPLIT_FILES[name]
    f_train = _resolve(r, splits[0] or d_train)
    f_val = _resolve(r, splits[1]) if splits[1] else (_resolve(r, d_val) if d_val else None)
    f_test = _resolve(r, splits[2] or d_test)
    train_s = read_split_file(f_train, f"{name} train split")
    val_s = read_split_file(f_val, f"{name} val split") if f_val is not None else None
    test_s = read_split_file(f_test, f"{name} test split")
    num_classes = max(y for _, y in train_s) + 1
    for s in (val_s, test_s):
        if s and (max(y for _, y in s) >= num_classes or min(y for _, y in s) < 0):
            raise ValueError(
                f"{name}: val/test labels outside the train split's 0..{num_classes - 1}"
            )
    order = check_class_order(class_order, num_classes)
    inv = inverse_order(order)
    raw_counts = np.bincount([y for _, y in train_s], minlength=num_classes)
    counts = [int(raw_counts[o]) for o in order]

    def make(samples, tf):
        return FileListDataset([(str(r / p), int(inv[y])) for p, y in samples], tf, preprocess=cfg)

    train, test = make(train_s, ttf), make(test_s, etf)
    val = make(val_s, etf) if val_s else None
    if name == "imagenet_lt" and num_classes == 1000:
        base = DATASETS[name].class_names()
    else:
        base = _names_from_paths(train_s, num_classes)
    info = _info(
        name,
        rho=None,
        n_max=None,
        seed=int(seed),
        class_order=order,
        source=str(r),
        splits={
            "train": str(f_train),
            "val": None if f_val is None else str(f_val),
            "test": str(f_test),
        },
        note="class counts come from the train split file; rho and n_max do not apply",
        observed_rho=float(max(counts) / max(1, min(counts))),
    )
    return LTSplit(
        train,
        val,
        test,
        counts,
        [base[o] for o in order],
        _finish_info(info, counts, train, val, test),
        [int(inv[y]) for _, y in train_s],
    )


# --------------------------------------------------------------------------- ImageFolder


def _scan_folder(d: Path) -> dict[str, list[Path]]:
    out = {}
    for cdir in sorted(p for p in d.iterdir() if p.is_dir()):
        files = sorted(
            f for f in cdir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        out[cdir.name] = files
    return out


def _imagefolder(root, rho, n_max, seed, class_order, val_per_class, ttf, etf, cfg) -> LTSplit:
    if root is None:
        raise ValueError("imagefolder_lt needs root= (a directory with train/<class>/ images)")
    r = Path(root)
    if not (r / "train").is_dir():
        raise FileNotFoundError(f"{r / 'train'} not found: expected root/train/<class>/<images>")
    train_map = _scan_folder(r / "train")
    base_names = [c for c, files in train_map.items() if files]
    if len(base_names) < 2:
        raise ValueError(f"{r / 'train'} needs at least 2 class folders with images")
    num_classes = len(base_names)
    order = check_class_order(class_order, num_classes)
    inv = inverse_order(order)
    pool = [f for c in base_names for f in train_map[c]]
    pool_lab = np.concatenate(
        [np.full(len(train_map[c]), i, dtype=np.int64) for i, c in enumerate(base_names)]
    )
    has_val = (r / "val").is_dir()
    pool_counts = np.bincount(pool_lab)
    balanced = pool_counts.min() >= BALANCED_TOLERANCE * pool_counts.max()
    # The profile is applied when rho is given and the folder is balanced (or n_max is
    # given); an already imbalanced folder is used as-is (its own counts are the tail).
    apply_profile = rho is not None and (balanced or n_max is not None)
    profile_note = None
    if rho is not None and not apply_profile:
        profile_note = "train folder is already imbalanced: used as-is, rho not applied"
        if rho != DEFAULT_RHO:
            warnings.warn(f"imagefolder_lt: {profile_note} (pass n_max to force it)", stacklevel=3)
    if apply_profile:
        smallest = int(np.bincount(pool_lab).min())
        hold = 0 if has_val else val_per_class
        nm = int(n_max) if n_max is not None else max(1, smallest - hold)
        counts = lt_counts(nm, num_classes, rho)
        tr_idx, tr_lab, va_idx, va_lab, v, _ = select_lt(
            pool_lab, order, counts, seed=seed, val_per_class=hold, dataset="imagefolder_lt"
        )
        train_samples = [(pool[i], int(y)) for i, y in zip(tr_idx, tr_lab, strict=True)]
        held = [(pool[i], int(y)) for i, y in zip(va_idx, va_lab, strict=True)]
    else:
        nm = None
        train_samples = sorted(  # grouped by new label, like the profile path
            ((f, int(inv[y])) for f, y in zip(pool, pool_lab, strict=True)), key=lambda s: s[1]
        )
        counts = [int(c) for c in np.bincount([y for _, y in train_samples], minlength=num_classes)]
        held, v = [], 0

    def folder(split: str) -> list[tuple[Path, int]] | None:
        if not (r / split).is_dir():
            return None
        out = []
        for c, files in _scan_folder(r / split).items():
            if not files:
                continue
            if c not in base_names:
                raise ValueError(f"{r / split / c}: class {c!r} does not exist in {r / 'train'}")
            out += [(f, int(inv[base_names.index(c)])) for f in files]
        return out

    val_samples = folder("val") if has_val else (held or None)
    test_samples = folder("test")
    test_note = None
    if test_samples is None:
        if val_samples is None:
            raise FileNotFoundError(
                f"imagefolder_lt: neither {r / 'test'} nor {r / 'val'} exists; a test set is required"
            )
        warnings.warn(
            f"imagefolder_lt: no {r / 'test'}; evaluating on the validation split", stacklevel=3
        )
        test_samples, test_note = val_samples, "no test folder: test is the validation split"
    train = FileListDataset(train_samples, ttf, preprocess=cfg)
    val = FileListDataset(val_samples, etf, preprocess=cfg) if val_samples else None
    test = FileListDataset(test_samples, etf, preprocess=cfg)
    info = _info(
        "imagefolder_lt",
        rho=float(rho) if apply_profile else None,
        n_max=nm,
        seed=int(seed),
        class_order=order,
        source=str(r),
        lt_profile_applied=apply_profile,
        val_source="val folder"
        if has_val
        else ("held out from unused train images" if v else None),
    )
    if test_note:
        info["test_note"] = test_note
    if profile_note:
        info["note"] = profile_note
    return LTSplit(
        train,
        val,
        test,
        counts,
        [base_names[o] for o in order],
        _finish_info(info, counts, train, val, test),
        [y for _, y in train_samples],
    )


# --------------------------------------------------------------------------- entry point


def build_lt_dataset(
    name: str,
    *,
    root: str | None = None,
    rho: float | None = None,
    n_max: int | None = None,
    seed: int = 0,
    class_order: list[int] | None = None,
    val_per_class: int = 20,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    train_split: str | None = None,
    val_split: str | None = None,
    test_split: str | None = None,
    val_from_train: bool = False,
    val_max_per_class: int = 0,
) -> LTSplit:
    """Build a long-tailed train split plus val/test splits (balanced unless ``val_max_per_class``).

    * ``fashion_mnist_lt`` (root default ``/usr/share/datasets/fashion-mnist``, the Debian
      ``dataset-fashion-mnist`` package), ``cifar10_lt`` / ``cifar100_lt`` (root holds
      ``cifar-10-batches-py`` / ``cifar-100-python``; default ``$LTZOO_DATA_ROOT`` or
      ``./data``): the exponential profile :func:`lt_counts` with ``rho`` (default 100) and
      ``n_max`` (defaults 1000 / 5000 / 500); which images is seeded by ``seed``; val is
      ``val_per_class`` unused training images per class; test is the official test set.
      ``cifar10_lt`` also reads JPEG class folders (``root/train/<class>/*.jpg``,
      ``root/test/<class>/*.jpg``, or ``root`` a tar of them): see :func:`read_jpeg_tree`;
      its results are labelled ``info["variant"] = "CIFAR-10 (JPEG copy)"``. With
      ``n_max=5000`` the head class uses all its 5,000 images, so there is no unused image
      left for a balanced val split (warning; no temperature fit) unless ``n_max`` is lower
      or ``val_from_train`` takes the head's ``val_per_class`` out of its training images.
      ``val_max_per_class`` (these datasets only) lets a class with more unused images give
      up to that many validation images: a larger split, imbalanced, weighed class by class
      (:func:`~ltzoo.training.data.profile.select_lt`). ``val_from_train`` applies to these
      profile datasets only.
    * ``imagenet_lt`` / ``places_lt`` / ``inat2018``: split files of ``path label`` lines
      under ``root`` (or the given paths); counts come from the train split, rho/n_max unused.
    * ``imagefolder_lt``: ``root/train/<class>/*`` (+ optional ``root/val``, ``root/test``);
      used as-is unless ``rho`` is given and the folder is balanced (or ``n_max`` is
      given): then the profile is applied, ``n_max`` defaulting to the smallest class size
      (minus ``val_per_class`` held out for validation when there is no ``root/val``).

    ``rho=None`` means the dataset's default (100 for the synthetic-LT datasets, "as-is" for
    the others). Transforms default to the dataset's evaluation ``Preprocess``.
    """
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(NAMES)}")
    cfg = _eval_default(name)
    etf = eval_transform if eval_transform is not None else Preprocess(cfg)
    ttf = train_transform if train_transform is not None else etf
    if name in DEFAULT_N_MAX:  # the profile-based builders (Fashion-MNIST, CIFAR)
        arrays = _fashion_mnist(root) if name == "fashion_mnist_lt" else _cifar(name, root)
        return _lt_from_arrays(
            name,
            arrays,
            rho=DEFAULT_RHO if rho is None else rho,
            n_max=n_max or DEFAULT_N_MAX[name],
            seed=seed,
            class_order=class_order,
            val_per_class=val_per_class,
            train_transform=ttf,
            eval_transform=etf,
            val_from_train=val_from_train,
            val_max_per_class=val_max_per_class,
        )
    if val_max_per_class:
        warnings.warn(
            f"{name}: val_max_per_class applies to the profile datasets only; ignored",
            stacklevel=2,
        )
    if name in SPLIT_FILES:
        if n_max is not None or rho not in (None, DEFAULT_RHO):
            warnings.warn(
                f"{name}: rho/n_max are ignored (counts come from the split file)", stacklevel=2
            )
        return _split_files(
            name,
            root,
            seed,
            class_order,
            ttf,
            etf,
            (train_split, val_split, test_split),
            cfg,
        )
    return _imagefolder(root, rho, n_max, seed, class_order, val_per_class, ttf, etf, cfg)
