"""Official-layout checkpoints holding seeded random weights, for offline runs of the official-weights path.

:func:`write_official_weights` writes, under a cache folder, one file per official release name at exactly
the path the loaders look for (``dino/<file>`` as :func:`nbsupport.models.backbones.expected_path`,
``groupvit/<file>`` as :func:`nbsupport.models.groupvit.weights.weights_path`), so that ``NBSUPPORT_CACHE``
pointed there and ``NBSUPPORT_OFFLINE=1`` run the same code as the real weights: ``fetch_release``'s checks,
``torch.load(weights_only=True)`` for DINO, the restricted unpickler for GroupViT, strict state-dict loads.

- DINO (``dino_vits16``, ``dino_vits8``, ``dino_vitb16``, ``dino_vitb8``): a plain dict of the ViT backbone's
  tensors with the keys and shapes of ``facebookresearch/dino``'s ``vision_transformer.py`` at 224 px (what
  its ``hubconf.py`` loads strictly).
- DINOv2 (``dinov2_vits14``, ``dinov2_vitb14`` and their ``_reg`` variants), at ``dinov2/<file>``: the same,
  with the keys of ``facebookresearch/dinov2``'s ``DinoVisionTransformer`` as ``hub/backbones.py`` builds it
  (518 px, patch 14, ``block_chunks=0``): ``cls_token``, ``pos_embed`` (1 + 37 * 37 positions),
  ``register_tokens`` (``_reg``: 4), ``mask_token``, ``patch_embed.proj``, blocks with ``ls1.gamma`` /
  ``ls2.gamma``, ``norm``.
- GroupViT (``group_vit_gcc_yfcc_30e``, ``group_vit_gcc_redcap_30e``): the dict NVlabs' ``save_checkpoint``
  writes: ``model`` (the ``MultiLabelContrastive`` state dict, an OrderedDict with ``_metadata``; the RedCaps
  run has ``multi_label: 0`` and so no ``multi_label_logit_scale``), ``optimizer`` (AdamW groups; the moments
  are left out: no loader reads them and they would triple the file), ``lr_scheduler``, ``metrics``,
  ``epoch``, ``config`` (the release's merged YAML as a pickled ``omegaconf.dictconfig.DictConfig``: a class
  from a package that is not installed, so ``torch.load(weights_only=True)`` refuses the file and only
  :func:`nbsupport.models.checkpoints.read_checkpoint` reads it), ``max_accuracy``, ``max_miou`` and ``amp``.

Provenance (:mod:`nbsupport.models.checkpoints`): each file holds a ``nbsupport_fixture.json`` record inside
its zip archive and gets two sidecars, ``<file>.source.json`` (``{"kind": "fixture", "sha256": ...}``) and
the ``<file>.sha256`` pin; ``fetch_release`` accepts the file only when all three agree with its bytes, and
every model loaded from it says "random weights, fixture" in ``nbs_info["description"]``.

Files are written tensor by tensor (memory stays at the largest tensor, 50 MB for GroupViT's token
embedding) into a zip laid out as ``torch.save`` lays it out (records aligned to 64 bytes, fixed
timestamps, a serialisation id derived from the content), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from nbsupport.core.io import atomic_write_json, atomic_write_text
from nbsupport.models import backbones
from nbsupport.models.checkpoints import (
    FIXTURE_KIND,
    FIXTURE_RECORD,
    CheckpointError,
    fixture_record,
    sha256,
    sidecar,
    source_sidecar,
)
from nbsupport.models.groupvit.weights import URLS as GROUPVIT_URLS
from nbsupport.models.groupvit.weights import weights_path

#: Bumped whenever the bytes written for a (name, seed) change; a cached file of another format is rewritten.
FORMAT = 1
DINO_NAMES = ("dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_vits8_300ep")
DINOV2_NAMES = ("dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitb14", "dinov2_vitb14_reg")
GROUPVIT_NAMES = ("group_vit_gcc_yfcc_30e", "group_vit_gcc_redcap_30e")
NAMES = DINO_NAMES + DINOV2_NAMES + GROUPVIT_NAMES
NOTE = "seeded random weights in the layout of the official release; NOT the release: it has learned nothing"


# ============================================================================================== tensors
@dataclass(frozen=True)
class Spec:
    """One tensor of a layout: its key, shape and how its random values are drawn (``init``: ``normal``
    (a standard normal clipped to [-2, 2], times ``value``), ``one`` (1 + ``value`` x the same), ``const``,
    ``count`` (an int64 scalar))."""

    key: str
    shape: tuple[int, ...]
    init: str = "normal"
    value: float = 0.02


def _linear(out: list[Spec], prefix: str, d_in: int, d_out: int, bias: bool = True, conv1d: bool = False) -> None:
    out.append(Spec(prefix + "weight", (d_out, d_in, 1) if conv1d else (d_out, d_in)))
    if bias:
        out.append(Spec(prefix + "bias", (d_out,)))


def _norm(out: list[Spec], prefix: str, dim: int) -> None:
    out += [Spec(prefix + "weight", (dim,), "one"), Spec(prefix + "bias", (dim,))]


def _mlp(out: list[Spec], prefix: str, d_in: int, d_hidden: int, d_out: int) -> None:
    _linear(out, prefix + "fc1.", d_in, d_hidden)
    _linear(out, prefix + "fc2.", d_hidden, d_out)


def _vit_block(out: list[Spec], prefix: str, dim: int) -> None:
    """A pre-norm block with a fused ``qkv`` (DINO's ``Block``, GroupViT's ``AttnBlock``)."""
    _norm(out, prefix + "norm1.", dim)
    _linear(out, prefix + "attn.qkv.", dim, 3 * dim)
    _linear(out, prefix + "attn.proj.", dim, dim)
    _norm(out, prefix + "norm2.", dim)
    _mlp(out, prefix + "mlp.", dim, 4 * dim, dim)


def dino_layout(arch: backbones.Arch) -> list[Spec]:
    """The tensors of a released DINO backbone file in their order (``vision_transformer.VisionTransformer``
    with ``num_classes=0``: own parameters first, then ``patch_embed``, ``blocks``, ``norm``; no head)."""
    dim, p = arch.embed_dim, arch.patch_size
    out = [Spec("cls_token", (1, 1, dim)), Spec("pos_embed", (1, (arch.img_size // p) ** 2 + 1, dim))]
    out += [Spec("patch_embed.proj.weight", (dim, 3, p, p)), Spec("patch_embed.proj.bias", (dim,))]
    for i in range(arch.depth):
        _vit_block(out, f"blocks.{i}.", dim)
    _norm(out, "norm.", dim)
    return out


def dinov2_layout(arch: backbones.Arch) -> list[Spec]:
    """The tensors of a released DINOv2 backbone file in their order (``DinoVisionTransformer``: own
    parameters ``cls_token``, ``pos_embed``, ``register_tokens`` when there are registers, ``mask_token``;
    then ``patch_embed``, ``blocks`` (norm1, attn, ls1, norm2, mlp, ls2), ``norm``). LayerScale gammas are
    drawn around 1 (spread 0.1), so every channel's scale differs and a dropped or swapped one shows."""
    dim, p = arch.embed_dim, arch.patch_size
    out = [Spec("cls_token", (1, 1, dim)), Spec("pos_embed", (1, (arch.img_size // p) ** 2 + 1, dim))]
    if arch.reg_tokens:
        out.append(Spec("register_tokens", (1, arch.reg_tokens, dim)))
    out += [Spec("mask_token", (1, dim))]
    out += [Spec("patch_embed.proj.weight", (dim, 3, p, p)), Spec("patch_embed.proj.bias", (dim,))]
    for i in range(arch.depth):
        b = f"blocks.{i}."
        _norm(out, b + "norm1.", dim)
        _linear(out, b + "attn.qkv.", dim, 3 * dim)
        _linear(out, b + "attn.proj.", dim, dim)
        out.append(Spec(b + "ls1.gamma", (dim,), "one", 0.1))
        _norm(out, b + "norm2.", dim)
        _mlp(out, b + "mlp.", dim, int(dim * arch.mlp_ratio), dim)
        out.append(Spec(b + "ls2.gamma", (dim,), "one", 0.1))
    _norm(out, "norm.", dim)
    return out


def _grouping_block(out: list[Spec], prefix: str, dim: int, n_groups: int, n_out: int) -> None:
    """NVlabs ``GroupingBlock`` with ``mlp_ratio=(0.5, 4.0)`` and no reduction (all stages share the width)."""
    _norm(out, prefix + "norm_tokens.", dim)
    _mlp(out, prefix + "mlp_inter.", n_groups, dim // 2, n_out)
    _norm(out, prefix + "norm_post_tokens.", dim)
    _norm(out, prefix + "norm_x.", dim)
    cross = prefix + "pre_assign_attn."  # CrossAttnBlock(post_norm=True): norm_post, unfused attention, mlp
    _norm(out, cross + "norm_post.", dim)
    for part in ("q_proj", "k_proj", "v_proj", "proj"):
        _linear(out, f"{cross}attn.{part}.", dim, dim)
    _norm(out, cross + "norm2.", dim)
    _mlp(out, cross + "mlp.", dim, 4 * dim, dim)
    for part in ("q_proj", "k_proj", "v_proj", "proj"):  # AssignAttention, 1 head, qkv bias
        _linear(out, f"{prefix}assign.{part}.", dim, dim)
    _norm(out, prefix + "norm_new_x.", dim)
    _mlp(out, prefix + "mlp_channels.", dim, 4 * dim, dim)


def _projector(out: list[Spec], prefix: str, d_in: int, inner: int, d_out: int) -> None:
    """NVlabs ``ProjectMLP`` with 2 layers: Conv1d, (Sync)BatchNorm with running statistics, ReLU, Conv1d."""
    _linear(out, prefix + "linear_hidden.0.", d_in, inner, conv1d=True)
    _norm(out, prefix + "linear_hidden.1.", inner)
    out += [
        Spec(prefix + "linear_hidden.1.running_mean", (inner,)),
        Spec(prefix + "linear_hidden.1.running_var", (inner,), "one", 0.1),
        Spec(prefix + "linear_hidden.1.num_batches_tracked", (), "count", 0),
    ]
    _linear(out, prefix + "linear_out.", inner, d_out, conv1d=True)


def groupvit_layout(model_cfg: dict) -> list[Spec]:
    """The ``model`` state dict of an NVlabs ``MultiLabelContrastive`` built from the ``model`` block of a
    release config, in state-dict order (own parameters, then ``img_encoder``, ``text_encoder``, projectors)."""
    enc, text = model_cfg["img_encoder"], model_cfg["text_encoder"]
    dim, patch, img = enc["embed_dim"], enc.get("patch_size", 16), enc.get("img_size", 224)
    depths, groups, outs = enc["depths"], enc["num_group_tokens"], enc["num_output_groups"]
    scale = math.log(1 / model_cfg["contrast_temperature"])
    out = [Spec("logit_scale", (), "const", scale)]
    if model_cfg["multi_label"] > 0:
        out.append(Spec("multi_label_logit_scale", (), "const", scale))
    e = "img_encoder."
    out += [Spec(e + "pos_embed", (1, (img // patch) ** 2, dim))]
    out += [Spec(e + "patch_embed.proj.weight", (dim, 3, patch, patch)), Spec(e + "patch_embed.proj.bias", (dim,))]
    _norm(out, e + "patch_embed.norm.", dim)
    for i, depth in enumerate(depths):
        layer = f"{e}layers.{i}."
        if groups[i]:
            out.append(Spec(layer + "group_token", (1, groups[i], dim)))
        for j in range(depth):
            _vit_block(out, f"{layer}blocks.{j}.", dim)
        if i < len(depths) - 1:
            _grouping_block(out, layer + "downsample.", dim, groups[i], outs[i])
        if i > 0 and groups[i]:  # LayerNorm + MixerMlp from the previous stage's group tokens
            _norm(out, layer + "group_projector.0.", dim)
            _mlp(out, layer + "group_projector.1.", groups[i - 1], dim // 2, groups[i])
    _norm(out, e + "norm.", dim)
    t, width = "text_encoder.", text["width"]
    out.append(Spec(t + "positional_embedding", (text["context_length"], width), "normal", 0.01))
    for j in range(text["layers"]):  # CLIP ResidualAttentionBlock around nn.MultiheadAttention
        b = f"{t}transformer.resblocks.{j}."
        out += [Spec(b + "attn.in_proj_weight", (3 * width, width)), Spec(b + "attn.in_proj_bias", (3 * width,))]
        _linear(out, b + "attn.out_proj.", width, width)
        _norm(out, b + "ln_1.", width)
        _linear(out, b + "mlp.c_fc.", width, 4 * width)
        _linear(out, b + "mlp.c_proj.", 4 * width, width)
        _norm(out, b + "ln_2.", width)
    _norm(out, t + "ln_final.", width)
    out.append(Spec(t + "token_embedding.weight", (text["vocab_size"], width)))
    _projector(out, "img_projector.", dim, 4096, model_cfg["output_dim"])
    _projector(out, "text_projector.", width, 4096, model_cfg["output_dim"])
    return out


def _module_versions(keys: Iterable[str]) -> collections.OrderedDict:
    """``state_dict()._metadata``: every module prefix owning a tensor (and its parents) with its version
    (2 for the BatchNorms, which hold ``num_batches_tracked``, else 1)."""
    keys = list(keys)
    bn = {k.rsplit(".", 1)[0] for k in keys if k.endswith("num_batches_tracked")}
    meta = collections.OrderedDict([("", {"version": 1})])
    for k in keys:
        parts = k.split(".")[:-1]
        for n in range(1, len(parts) + 1):
            prefix = ".".join(parts[:n])
            meta.setdefault(prefix, {"version": 2 if prefix in bn else 1})
    return meta


def make_tensor(spec: Spec, seed: int, name: str) -> torch.Tensor:
    """The random values of one tensor: float32 from a generator seeded by (seed, release name, key), so each
    tensor is reproducible on its own and independent of the others."""
    if spec.init == "count":
        return torch.tensor(int(spec.value), dtype=torch.int64)
    if spec.init == "const":
        return torch.full(spec.shape, spec.value, dtype=torch.float32)
    digest = hashlib.sha256(f"{seed}/{name}/{spec.key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    t = torch.randn(spec.shape, generator=g).clamp_(-2, 2).mul_(spec.value)
    return t.add_(1.0) if spec.init == "one" else t


# ============================================================================================== pickling
class _Tensor:
    """Stands in for a tensor while the pickle is written: pickled as ``torch.save`` pickles a contiguous
    CPU tensor (``_rebuild_tensor_v2`` of storage ``key``), without its values existing yet."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.key, self.shape, self.dtype = key, tuple(shape), dtype
        self.stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))


class _Global:
    """A class named by module and name, written to the pickle without being imported (it need not exist)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


_GLOBALS: dict[tuple[str, str], _Global] = {}


def _global(module: str, name: str) -> _Global:
    return _GLOBALS.setdefault((module, name), _Global(module, name))


class _Foreign:
    """An instance of a class from another package (OmegaConf): pickled as ``copyreg.__newobj__`` of that
    class plus its state, as ``object.__reduce_ex__(2)`` would pickle the real object."""

    def __init__(self, module: str, name: str, state):
        self.cls, self.state = _global(module, name), state


class _Storage:
    """The storage of a :class:`_Tensor`: pickled as a persistent id, as ``torch.save`` does."""

    def __init__(self, tensor: _Tensor):
        self.tensor = tensor


_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.int64: "LongStorage"}


class _Pickler(pickle._Pickler):
    """The pure-Python pickler (protocol 2, what ``torch.save`` uses) taught the three stand-ins above."""

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            t = obj.tensor
            return ("storage", getattr(torch, _STORAGE_TYPES[t.dtype]), t.key, "cpu", math.prod(t.shape))
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            args = (_Storage(obj), 0, obj.shape, obj.stride, False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        return NotImplemented

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, (_Global, _Foreign)):
            memo = self.memo.get(id(obj))
            if memo is not None:
                self.write(self.get(memo[0]))
                return
            if isinstance(obj, _Global):
                self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
                self.memoize(obj)
                return
            self.save(obj.cls)
            self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
            self.memoize(obj)
            self.save(obj.state)
            self.write(pickle.BUILD)
            return
        super().save(obj, save_persistent_id)


def dumps(obj) -> bytes:
    """``data.pkl`` of a checkpoint holding ``obj`` (with :class:`_Tensor` / :class:`_Foreign` stand-ins)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


# ============================================================================================== archive
_EPOCH = (1980, 1, 1, 0, 0, 0)  # torch.save's fixed timestamps


def _record(zf: zipfile.ZipFile, fh, name: str, data) -> None:
    """Append one stored record whose data starts at a multiple of 64 bytes (torch's ``FB`` padding field)."""
    view = memoryview(data).cast("B")
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type, info.file_size = zipfile.ZIP_STORED, view.nbytes
    pad = -(fh.tell() + 30 + len(name.encode("utf-8")) + 4) % 64
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w") as f:
        f.write(view)


def write_archive(path: Path, obj, tensors: list[tuple[_Tensor, Callable[[], torch.Tensor]]], marker: dict) -> None:
    """Write a PyTorch zip checkpoint of ``obj`` to ``path`` atomically, generating each tensor only when its
    record is written (``tensors``: stand-in and a function making its values, in pickle order), with the
    fixture ``marker`` as an extra JSON record. Same inputs, same bytes."""
    prefix = path.stem
    pkl = dumps(obj)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # one per writer: concurrent builds do not collide
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            _record(zf, fh, f"{prefix}/data.pkl", pkl)
            for name, text in ((".format_version", "1"), (".storage_alignment", "64"), ("byteorder", sys.byteorder)):
                _record(zf, fh, f"{prefix}/{name}", text.encode())
            for ref, make in tensors:
                t = make().contiguous()
                if tuple(t.shape) != ref.shape or t.dtype != ref.dtype:
                    raise ValueError(f"tensor {ref.key}: made {tuple(t.shape)} {t.dtype}, pickled {ref.shape}")
                _record(zf, fh, f"{prefix}/data/{ref.key}", t.view(-1).view(torch.uint8).numpy())
                del t
            marker_bytes = json.dumps(marker, sort_keys=True).encode()
            _record(zf, fh, f"{prefix}/{FIXTURE_RECORD}", marker_bytes)
            _record(zf, fh, f"{prefix}/version", b"3\n")
            sid = int.from_bytes(hashlib.sha256(pkl + marker_bytes).digest()[:16], "big")
            _record(zf, fh, f"{prefix}/.data/serialization_id", str(sid).zfill(40)[:40].encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _refs(specs: list[Spec], seed: int, name: str):
    """Stand-ins (key -> :class:`_Tensor`, storage keys "0", "1", ... in order) and their value makers."""
    sd, makers = {}, []
    for i, spec in enumerate(specs):
        dtype = torch.int64 if spec.init == "count" else torch.float32
        ref = _Tensor(str(i), spec.shape, dtype)
        sd[spec.key] = ref
        makers.append((ref, lambda spec=spec: make_tensor(spec, seed, name)))
    return sd, makers


# ============================================================================================== GroupViT
def release_config(name: str) -> dict:
    """The merged training config (``configs/default.yml`` + ``configs/<name>.yml`` of NVlabs/GroupViT, as
    ``get_config`` leaves it) that the release pickles under ``config``: the blocks the model and training
    are defined by. The RedCaps run keeps the default ``multi_label: 0``."""
    multi_label = 0 if "redcap" in name else 3
    data = {"batch_size": 256, "pin_memory": True, "num_workers": 6, "shuffle_buffer": 10000, "seed": 0}
    data["dataset"] = {
        "train": ["gcc3m", "gcc12m", "redcap12m" if multi_label == 0 else "yfcc14m"],
        "val": ["imagenet"],
    }
    data["img_aug"] = {"deit_aug": True, "img_size": 224, "img_scale": [0.08, 1.0], "interpolation": "bilinear"}
    data["text_aug"] = {"max_seq_len": 77, "multi_label": multi_label, "word_type": "noun"}
    image = {"type": "GroupViT", "embed_dim": 384, "num_heads": [6, 6, 6], "depths": [6, 3, 3]}
    image.update(num_group_tokens=[64, 8, 0], num_output_groups=[64, 8], drop_rate=0.0, drop_path_rate=0.1)
    text = {"type": "TextTransformer", "context_length": 77, "width": 256, "layers": 12, "vocab_size": 49408}
    model = {"type": "MultiLabelContrastive", "img_encoder": image, "text_encoder": text}
    model.update(contrast_temperature=0.07, proj_num_layers=2, output_dim=256, multi_label=multi_label)
    train = {"start_epoch": 0, "epochs": 30, "warmup_epochs": 2, "base_lr": 1.6e-3, "weight_decay": 0.05}
    train.update(warmup_lr=4e-6, min_lr=4e-5, clip_grad=5.0, accumulation_steps=0, amp_opt_level="O1", seed=0)
    train.update(lr_scheduler={"name": "cosine"}, optimizer={"name": "adamw", "eps": 1e-8, "betas": [0.9, 0.999]})
    cfg = {"data": data, "model": model, "train": train}
    cfg["evaluate"] = {"eval_only": False, "eval_freq": 1, "task": ["cls", "seg"]}
    cfg["checkpoint"] = {"auto_resume": True, "resume": "", "freq": 1, "max_kept": -1, "save_freq": 1}
    cfg.update(model_name=f"{name}_bs256x16", output=f"output/{name}_bs256x16", tag="default", print_freq=10)
    cfg.update(seed=0, wandb=False, local_rank=0, vis=[])
    return cfg


def _omegaconf(value, parent=None, key=None, flags=None):
    """``value`` as OmegaConf 2.1 pickles it: DictConfig / ListConfig with their metadata and ``AnyNode``
    leaves, each pointing back at its parent."""
    any_type = _global("typing", "Any")
    if not isinstance(value, (dict, list)):
        meta = {"ref_type": any_type, "object_type": None, "optional": True, "key": key, "flags": {}}
        leaf = {"_val": value, "_metadata": _Foreign("omegaconf.base", "Metadata", meta), "_parent": parent}
        return _Foreign("omegaconf.nodes", "AnyNode", leaf)
    kind = "dict" if isinstance(value, dict) else "list"
    meta = {
        "ref_type": any_type,
        "object_type": _global("builtins", kind),
        "optional": True,
        "key": key,
        "flags": dict(flags or {}),
        "flags_root": False,
        "key_type": any_type if kind == "dict" else _global("builtins", "int"),
        "element_type": any_type,
    }
    state = {"_metadata": _Foreign("omegaconf.base", "ContainerMetadata", meta), "_parent": parent}
    node = _Foreign(f"omegaconf.{kind}config", f"{kind.capitalize()}Config", state)
    if kind == "dict":
        state["_content"] = {k: _omegaconf(v, node, k) for k, v in value.items()}
    else:
        state["_content"] = [_omegaconf(v, node, i) for i, v in enumerate(value)]
    state["_flags_cache"] = None
    return node


def _groupvit_release(name: str, seed: int):
    cfg = release_config(name)
    specs = groupvit_layout(cfg["model"])
    model, makers = _refs(specs, seed, name)
    train = cfg["train"]
    # AdamW over the parameters (not the BatchNorm buffers), as NVlabs' set_weight_decay groups them: 1-d
    # tensors and biases without weight decay
    params = [s for s in specs if not s.key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    no_decay = [i for i, s in enumerate(params) if len(s.shape) == 1 or s.key.endswith(".bias")]
    decay = sorted(set(range(len(params))) - set(no_decay))
    group = {"lr": train["min_lr"], "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}
    group["initial_lr"] = train["base_lr"]
    optimizer = {
        "state": {},
        "param_groups": [
            dict(group, weight_decay=train["weight_decay"], params=decay),
            dict(group, weight_decay=0.0, params=no_decay),
        ],
    }
    steps = 1000  # the fixture's own iterations per epoch: scheduler state only, which no loader reads
    lr, warm = train["base_lr"], train["warmup_epochs"] * steps
    scheduler = {"param_group_field": "lr", "base_values": [lr, lr], "metric": None, "t_in_epochs": False}
    scheduler.update(noise_range_t=None, noise_pct=0.67, noise_std=1.0, noise_seed=42, t_mul=1.0, decay_rate=1.0)
    scheduler.update(t_initial=train["epochs"] * steps, lr_min=train["min_lr"], warmup_t=warm, cycle_limit=1)
    scheduler.update(warmup_lr_init=train["warmup_lr"], warmup_prefix=False)
    scheduler["warmup_steps"] = [(lr - train["warmup_lr"]) / warm] * 2
    metrics = {"max_accuracy": 0.0, "max_miou": 0.0}  # random weights: nothing learned
    obj = {
        "model": _OrderedDictWithMeta(model, _module_versions(model)),
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "metrics": metrics,
        "epoch": train["epochs"] - 1,
        "config": _omegaconf(cfg, flags={"struct": True, "readonly": True}),
        **metrics,
        "amp": collections.OrderedDict([("loss_scaler0", {"loss_scale": 65536.0, "unskipped": 0})]),
    }
    return obj, makers


class _OrderedDictWithMeta(collections.OrderedDict):
    """An OrderedDict pickled as ``state_dict()`` is: ``collections.OrderedDict`` with ``_metadata`` state."""

    def __init__(self, items, metadata):
        super().__init__(items)
        self._metadata = metadata

    def __reduce__(self):
        return collections.OrderedDict, (), {"_metadata": self._metadata}, None, iter(self.items())


# ============================================================================================== writing
def target_path(name: str, cache_dir: str | Path) -> Path:
    """Where the loaders look for release ``name`` under ``cache_dir`` (``NBSUPPORT_CACHE``)."""
    if name in DINO_NAMES or name in DINOV2_NAMES:
        return backbones.expected_path(name, cache_dir)
    if name in GROUPVIT_NAMES:
        return weights_path(name, cache_dir)
    raise ValueError(f"{name!r} is not an official release name: use some of {list(NAMES)}")


def release_url(name: str) -> str:
    return GROUPVIT_URLS[name] if name in GROUPVIT_NAMES else backbones.release(name).url


def _is_current(path: Path, name: str, seed: int) -> bool:
    """A fixture of this name, seed and format is at ``path``, its marker, pin and bytes all agreeing."""
    src = source_sidecar(path)
    if not (path.is_file() and src.is_file() and sidecar(path).is_file()):
        return False
    try:
        meta = json.loads(src.read_text())
    except ValueError:
        return False
    want = {"kind": FIXTURE_KIND, "name": name, "seed": seed, "format": FORMAT}
    if any(meta.get(k) != v for k, v in want.items()):
        return False
    digest = sha256(path)
    return digest == meta.get("sha256") == sidecar(path).read_text().strip()


def write_official_weights(cache_dir: str | Path, names: Iterable[str] | None = None, seed: int = 0) -> dict[str, Path]:
    """Write random-weight checkpoints in the official layouts for ``names`` (default: all of :data:`NAMES`)
    under ``cache_dir``, at the paths the loaders use; returns ``{name: path}``.

    A file already there as a fixture of the same name, seed and :data:`FORMAT` (marker, pin and bytes
    agreeing) is kept, so a cached fixture folder is reused; a stale fixture is rewritten. A file there that
    is not a fixture (a downloaded release) is never overwritten: :class:`CheckpointError`."""
    names = list(NAMES if names is None else names)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown release names {unknown}: use some of {list(NAMES)}")
    out = {}
    for name in names:
        path = target_path(name, cache_dir)
        out[name] = path
        if _is_current(path, name, seed):
            continue
        if path.exists() and fixture_record(path) is None:  # every file written here carries the record
            raise CheckpointError(
                f"{path} exists and is not a fixture (no {FIXTURE_RECORD} record): it may be the real release. "
                "Refusing to overwrite it; point cache_dir at a folder of its own."
            )
        marker = {"kind": FIXTURE_KIND, "name": name, "seed": seed, "format": FORMAT, "note": NOTE}
        if name in DINO_NAMES or name in DINOV2_NAMES:
            layout = dino_layout if name in DINO_NAMES else dinov2_layout
            sd, makers = _refs(layout(backbones.release(name).arch), seed, name)
            obj = sd  # the released files are a plain dict of the backbone's tensors
        else:
            obj, makers = _groupvit_release(name, seed)
        write_archive(path, obj, makers, marker)
        digest = sha256(path)
        atomic_write_text(sidecar(path), digest + "\n")
        source = dict(marker, sha256=digest, bytes=path.stat().st_size, release_url=release_url(name))
        atomic_write_json(source_sidecar(path), source, indent=1)
    return out
