"""Official weights on disk: the one download-and-verify path every loader uses (:func:`fetch_release`), the
errors every loader raises, and a restricted unpickler for official releases that pickle more than tensors
(no code from the file ever runs).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import urllib.error
import zipfile
from pathlib import Path

import torch

from nbsupport.core import paths


class WeightsUnavailableError(FileNotFoundError):
    """Official weights are not in the cache and cannot be downloaded (offline)."""


class CheckpointError(ValueError):
    """A checkpoint file that is not a ViT in the expected layout."""


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ============================================================================================== download
def offline() -> bool:
    """``NBSUPPORT_OFFLINE=1``: nothing is downloaded; a missing file is an error saying where to put it."""
    return os.environ.get("NBSUPPORT_OFFLINE") == "1"


def sidecar(path: Path) -> Path:
    """``<file>.sha256``: the hash recorded when ``path`` was downloaded (for releases without a pinned one)."""
    return path.with_name(path.name + ".sha256")


def missing_message(what: str, url: str, dst: Path, loader: str, alternatives=()) -> str:
    """The error text for weights that are not on disk: the URL, the exact path to put the file at, the
    ``NBSUPPORT_CACHE`` layout and the offline alternatives."""
    try:
        rel = dst.relative_to(paths.cache_dir())
    except ValueError:
        rel = Path(dst.parent.name) / dst.name
    alt = f" Offline alternatives: {', '.join(alternatives)}." if alternatives else ""
    return (
        f"{what} are not available offline. Download\n  {url}\nand put the file at\n  {dst}\n"
        f"(or set NBSUPPORT_CACHE to a folder holding {rel.as_posix()}, or pass the file's path to {loader})."
        f"{alt}"
    )


def verify(path: Path, url: str, size: int | None = None, sha256_hex: str | None = None) -> None:
    """Refuse a cached file that is not the release: wrong size (when known), or a SHA-256 that differs from
    the pinned one (else from the one recorded in :func:`sidecar` at download). Raises :class:`CheckpointError`."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise CheckpointError(
            f"{path} has {got_size} bytes but must have {size}: the file is truncated or not {url}. "
            "Delete it and download again."
        )
    pinned = sha256_hex
    if pinned is None and sidecar(path).is_file():
        pinned = sidecar(path).read_text().strip()
    if pinned is not None:
        got = sha256(path)
        if got != pinned:
            raise CheckpointError(
                f"{path}: sha256 {got[:12]}... differs from the recorded {pinned[:12]}... of {url}; the file "
                "changed since it was downloaded. Delete it and download again."
            )


def fetch_release(
    url: str,
    dst: Path,
    what: str,
    loader: str,
    size: int | None = None,
    sha256_hex: str | None = None,
    alternatives=(),
    download: bool = True,
    progress: bool = True,
) -> Path:
    """The verified local copy ``dst`` of the official weights at ``url``, downloaded once.

    Used by every loader of official weights (DINO: ``$NBSUPPORT_CACHE/dino/...``, GroupViT:
    ``$NBSUPPORT_CACHE/groupvit/<release file>``). A missing file is downloaded with torch.hub (a temporary
    file renamed at the end: no half file is left behind) unless ``download=False`` or ``NBSUPPORT_OFFLINE=1``,
    which raise :class:`WeightsUnavailableError` naming the URL and ``dst``. Every use checks the size
    (when known) and the SHA-256: ``sha256_hex`` when pinned, else the hash recorded beside the file at its
    first download (:func:`sidecar`); a mismatch raises :class:`CheckpointError`. ``what`` / ``loader`` /
    ``alternatives`` word the error (e.g. ``"Weights for 'dino_vits8'"``, ``"nbsupport.models.backbones.load"``)."""
    dst = Path(dst)
    if dst.is_file():
        verify(dst, url, size, sha256_hex)
        return dst
    msg = missing_message(what, url, dst, loader, alternatives)
    if not download or offline():
        raise WeightsUnavailableError(msg)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=progress)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise WeightsUnavailableError(msg + f"\n(download failed: {e})") from e
    verify(dst, url, size, sha256_hex)
    if sha256_hex is None:
        sidecar(dst).write_text(sha256(dst) + "\n")
    return dst


# ============================================================================================== weights
class _Inert:
    """Stand-in for every class a checkpoint names that is not a tensor or a plain container: it accepts
    any constructor arguments and state and keeps nothing, so no code from the file ever runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage, offset, size, stride, *args):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, *args):
    return data


def _inert_reconstructor(*args):
    return _Inert()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch zip checkpoint's ``data.pkl`` allowing only tensor rebuilding and plain containers;
    any other global (OmegaConf configs, optimiser classes, ``os.system`` ...) resolves to :class:`_Inert`."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.zf, self.prefix, self.storages, self.skipped = zf, prefix, {}, set()

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "copyreg" and name == "_reconstructor":
            return _inert_reconstructor
        self.skipped.add(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        dtype = storage_type if isinstance(storage_type, torch.dtype) else getattr(storage_type, "dtype", None)
        if dtype is None:
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        if key not in self.storages:
            raw = bytearray(self.zf.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def read_checkpoint(path: str | Path) -> dict:
    """Read a PyTorch zip checkpoint without executing anything from it.

    Trusted: only the tensor bytes and the dict/list/OrderedDict structure. Every other object in the
    pickle (the official GroupViT file stores an OmegaConf config, optimiser and scheduler state) is replaced
    by an inert placeholder, so ``torch.load(weights_only=True)``'s failure on those classes is avoided
    without ever importing or calling them. Returns the top-level object (a dict)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a PyTorch zip checkpoint (legacy pickled files are not read "
            "for safety; re-save it with torch>=1.6)"
        )
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: no data.pkl inside the zip checkpoint")
        prefix = pkl[0][: -len("/data.pkl")]
        up = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix)
        obj = up.load()
    return obj
