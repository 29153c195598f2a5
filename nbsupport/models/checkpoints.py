"""Reading checkpoint files safely: the errors every loader raises and a restricted unpickler for official
releases that pickle more than tensors (no code from the file ever runs).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import torch


class WeightsUnavailableError(FileNotFoundError):
    """Official weights are not in the cache and cannot be downloaded (offline)."""


class CheckpointError(ValueError):
    """A checkpoint file that is not a ViT in the expected layout."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
