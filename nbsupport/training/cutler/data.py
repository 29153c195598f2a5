"""CutLER's training data: COCO-format pseudo-masks with bad-input handling, an endless seeded sampler that
resumes exactly, aspect-ratio grouped batches, and where notebook 06's pseudo-labels and ground truth come
from (:func:`training_labels`: the synthetic world or ImageNet train, MaskCut or CutLER's released file;
:func:`evaluation_set`: the synthetic world or COCO val2017).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from nbsupport.data.datasets.imagenet import read_pseudo_labels
from nbsupport.training.cutler.model import masks_to_boxes

# --------------------------------------------------------------------------------------------------
# Data


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


class PseudoMaskDataset(torch.utils.data.Dataset):
    """COCO-format (pseudo-)instances for training and prediction.

    Bad input never stops a run: images without annotations are skipped in training (``train=True``,
    as detectron2 does) and kept for prediction; annotations without a segmentation, with an RLE whose size
    differs from the image, or whose mask is empty inside the image (e.g. a polygon entirely outside it)
    are dropped; zero-width/height boxes are replaced by the box of the mask; a corrupt or unreadable image
    makes ``__getitem__`` return ``None`` (dropped by :func:`collate`). Each problem is warned about once
    with the file and counted in ``problems``. Items: ``(image float [3, H, W] in 0..1, target)``.
    """

    def __init__(self, ann_file, image_root=None, train: bool = True, data: dict | None = None):
        self.ann_file = Path(ann_file) if ann_file is not None else None
        self.data = data if data is not None else read_pseudo_labels(ann_file, strict=False).data
        self.image_root = (
            Path(image_root)
            if image_root is not None
            else (self.ann_file.parent / "images" if self.ann_file else Path("."))
        )
        self.train = train
        self.problems = Counter()
        by_img: dict[int, list] = {}
        for a in self.data["annotations"]:
            if a.get("iscrowd", 0):
                continue
            if "segmentation" not in a or not a["segmentation"]:
                self._problem("annotation without segmentation", f"annotation {a.get('id')}")
                continue
            by_img.setdefault(a.get("image_id"), []).append(a)
        if not self.data["annotations"]:
            _warn(f"{self.ann_file}: no annotations at all" + (" - nothing to train on" if train else ""))
        self.records = []
        for im in self.data["images"]:
            anns = by_img.get(im["id"], [])
            if train and not anns:
                self.problems["image without annotations"] += 1
                continue
            self.records.append((im, anns))
        if self.problems["image without annotations"]:
            _warn(f"{self.ann_file}: skipped {self.problems['image without annotations']} images without annotations")
        if train and not self.records:
            raise ValueError(
                f"{self.ann_file}: no image with annotations to train on "
                f"({len(self.data['images'])} images, {len(self.data['annotations'])} annotations)"
            )

    def _problem(self, kind: str, where: str) -> None:
        if self.problems[kind] == 0:
            _warn(f"{self.ann_file}: {kind} ({where}); such items are skipped/fixed and counted in .problems")
        self.problems[kind] += 1

    def __len__(self):
        return len(self.records)

    def image_ids(self) -> list[int]:
        return [im["id"] for im, _ in self.records]

    def decode_masks(self, info: dict, anns: list) -> tuple[np.ndarray, list]:
        """uint8 ``[N, H, W]`` masks of the usable annotations and the annotations kept."""
        H, W = int(info["height"]), int(info["width"])
        masks, kept = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 copy= notice
            for a in anns:
                self._decode_one(a, H, W, masks, kept)
        arr = np.stack(masks) if masks else np.zeros((0, H, W), np.uint8)
        return arr, kept

    def _decode_one(self, a, H, W, masks, kept):
        from pycocotools import mask as mu

        seg = a["segmentation"]
        try:
            if isinstance(seg, list):
                polys = [p for p in seg if len(p) >= 6]
                if not polys:
                    raise ValueError("polygon with < 3 points")
                m = mu.decode(mu.merge(mu.frPyObjects(polys, H, W)))
            else:
                rle = seg
                if list(rle.get("size", [])) != [H, W]:
                    self._problem(
                        "RLE size differs from the image size",
                        f"annotation {a.get('id')}, RLE {rle.get('size')} vs image {[H, W]}",
                    )
                    return
                if isinstance(rle.get("counts"), list):
                    rle = mu.frPyObjects(rle, H, W)
                m = mu.decode(rle)
        except Exception as e:  # noqa: BLE001 - a broken annotation must not stop training
            self._problem("undecodable segmentation", f"annotation {a.get('id')}: {e}")
            return
        if not m.any():
            self._problem("empty mask (outside the image?)", f"annotation {a.get('id')}")
            return
        bw, bh = (a.get("bbox") or [0, 0, 0, 0])[2:4]
        if bw <= 0 or bh <= 0:
            self._problem("degenerate box (zero width/height), replaced by the mask's box", f"annotation {a.get('id')}")
        masks.append(m)
        kept.append(a)

    def __getitem__(self, i):
        from nbsupport.data.images import ImageLoadError, load_image

        info, anns = self.records[i]
        path = self.image_root / info["file_name"]
        try:
            img = load_image(path)
        except (ImageLoadError, OSError, ValueError) as e:
            self._problem("unreadable image", str(path))
            _warn(f"skipping unreadable image {path}: {e}")
            return None
        if (img.height, img.width) != (int(info["height"]), int(info["width"])):
            self._problem(
                "image size differs from the JSON",
                f"{path}: file {img.height}x{img.width}, JSON {info['height']}x{info['width']}",
            )
            return None
        masks, _ = self.decode_masks(info, anns)
        if self.train and len(masks) == 0:
            return None
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        m = torch.from_numpy(masks)
        target = {
            "masks": m,
            "boxes": masks_to_boxes(m),
            "labels": torch.ones(len(m), dtype=torch.int64),
            "image_id": int(info["id"]),
        }
        return image, target


def collate(batch):
    """List collate that drops ``None`` items (unreadable images): ``(images, targets)`` lists."""
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], [b[1] for b in batch]


class StreamSampler(torch.utils.data.Sampler):
    """Infinite, resumable stream of dataset indices for iteration-based training.

    Epoch ``e`` is a ``DistributedSampler(shuffle=True, seed=seed)`` permutation with ``set_epoch(e)``
    (this rank's shard); the stream starts at position ``start`` (= iteration x per-rank batch), so a run
    resumed at iteration ``k`` sees exactly the images it would have seen without the interruption.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world_size, start
        self.per_rank = math.ceil(n / world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        from torch.utils.data.distributed import DistributedSampler

        ds = DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.seed)
        ds.set_epoch(epoch)
        return list(ds)

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_indices(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self):  # effectively infinite
        return 2**62


def aspect_groups(dataset) -> list[int]:
    """Aspect-ratio group per dataset item (0: width >= height, 1: portrait), from the COCO ``width`` /
    ``height`` of each record (items without them go to group 0)."""
    out = []
    for im, _ in dataset.records:
        w, h = im.get("width"), im.get("height")
        out.append(int(bool(w and h and h > w)))
    return out


class GroupedStreamBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices from an infinite index stream, each batch from one aspect-ratio
    group (as detectron2's ``AspectRatioGroupedDataset`` / torchvision's ``GroupedBatchSampler``): the
    stream is read in order, each index goes to its group's buffer, a full buffer is emitted. Images of a
    batch then share an orientation and the padded batch tensor wastes less memory.

    Resumable: batches are a deterministic function of the stream, so ``skip`` batches are regenerated
    (indices only, no image is loaded) and dropped; a run resumed at iteration ``k`` (``skip=k``) sees the
    same batches as one never interrupted.
    """

    def __init__(self, stream, groups, batch_size: int, skip: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stream, self.groups, self.batch_size, self.skip = stream, list(groups), batch_size, skip

    def __iter__(self):
        buffers: dict[int, list[int]] = {}
        emitted = 0
        for i in self.stream:
            buf = buffers.setdefault(self.groups[i], [])
            buf.append(i)
            if len(buf) == self.batch_size:
                if emitted >= self.skip:
                    yield list(buf)
                emitted += 1
                buf.clear()

    def __len__(self):  # effectively infinite
        return 2**62


# --------------------------------------------------------------------------------------------------
# Where notebook 06's pseudo-labels and ground truth come from: the synthetic world, or ImageNet train
# (CutLER's layout) and COCO val2017 (the official one)

#: ``dataset`` values of :func:`training_labels` -> what ``root`` must hold.
TRAIN_LAYOUTS = {"imagenet": "imagenet/train/<wnid>/*.JPEG (CutLER's MaskCut input; annotations/ beside train/)"}
#: ``pseudo_labels`` value naming CutLER's released file in its place under the ImageNet folder.
RELEASED = "cutler"


class TrainingLabels(NamedTuple):
    """What :func:`training_labels` returns."""

    data: dict  # COCO dict of the pseudo-masks (image records with the sizes of the image files)
    path: Path  # a file holding them (what self-training relabels from)
    image_root: Path  # what the records' file_name is relative to
    source: str  # what they are and on which images, for titles ("MaskCut by <backbone>" on the synthetic world)
    images: object = None  # the training images with ground truth (CocoInstances; synthetic world only)
    score: dict | None = None  # the MaskCut masks against that ground truth (:func:`nbsupport.maskcut.pipeline.score`)


class EvaluationSet(NamedTuple):
    """What :func:`evaluation_set` returns: one set of images with ground truth, in two views."""

    images: object  # CocoInstances: loading, ground-truth masks, MaskCut through nbsupport.maskcut.pipeline
    dataset: PseudoMaskDataset  # the same records for prediction (train=False; crowd regions kept in .data)
    name: str  # e.g. "COCO val2017 (5000 images)", for titles


def sample_indices(n_total: int, n: int | None, seed: int = 0) -> list[int]:
    """``n`` distinct indices of ``range(n_total)`` drawn with ``seed``, ascending; all of them when ``n`` is
    None or at least ``n_total``."""
    if n is None or int(n) >= n_total:
        return list(range(n_total))
    if int(n) < 1:
        raise ValueError(f"n_images must be >= 1 or None (all), got {n}")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n_total, int(n), replace=False))


def _subset_images(data: dict, n: int | None, seed: int) -> dict:
    """``data`` restricted to a seeded sample of ``n`` of its images (by ascending id) and their annotations."""
    ids = sorted(im["id"] for im in data["images"])
    keep = {ids[i] for i in sample_indices(len(ids), n, seed)}
    return {
        **data,
        "images": [im for im in data["images"] if im["id"] in keep],
        "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
    }


def folder_maskcut(
    model, folder, indices=None, size: int = 480, n_masks: int = 3, tau="auto", crf: bool = False,
    batch_size: int = 8, device=None, progress: bool = False,
) -> dict:  # fmt: skip
    """MaskCut's pseudo-labels for images of an :class:`~nbsupport.data.datasets.imagenet.ImageNetFolder` as
    CutLER's ``maskcut.py`` writes them for ImageNet: one record per image, ``file_name`` ``<wnid>/<file>``
    (relative to ``folder.image_root``), id = position in the folder's order + 1 (a subset keeps the ids of
    the full run), but ``width`` / ``height`` as the file is (not swapped); one class-agnostic RLE
    annotation per non-empty mask (:func:`nbsupport.maskcut.pipeline.image_masks`). ``indices``: default all."""
    from nbsupport.maskcut.coco import coco_annotations, coco_json
    from nbsupport.maskcut.pipeline import image_masks

    indices = list(range(len(folder)) if indices is None else indices)
    chunks = range(0, len(indices), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="maskcut", unit="batch")
    images, anns = [], []
    for s in chunks:
        chunk = indices[s : s + batch_size]
        pils = [folder[i][0] for i in chunk]
        for i, im, m in zip(chunk, pils, image_masks(model, pils, size, n_masks, tau, crf, device)):
            images.append({"id": i + 1, "file_name": folder.files[i], "height": im.height, "width": im.width})
            anns += coco_annotations(m, i + 1)
    out = coco_json(images, anns)
    out["info"] = {"description": f"MaskCut pseudo-masks of {folder.image_root} (nbsupport)"}
    return out


def training_labels(
    dataset: str | None = None,
    root=None,
    pseudo_labels=None,
    out_dir=".",
    model=None,
    n_images: int | None = None,
    seed: int = 0,
    image_size: int = 128,
    maskcut_size: int = 480,
    n_masks: int = 3,
    tau="auto",
    crf: bool = False,
    device=None,
    progress: bool = False,
) -> TrainingLabels:
    """The pseudo-labels CutLER trains on and the images they belong to.

    ``dataset``: ``None`` (the synthetic world's train split: ``n_images`` scenes of ``image_size`` px from
    ``seed``, overlapping objects allowed) or ``"imagenet"`` (``root`` is the ``imagenet`` folder of
    :data:`TRAIN_LAYOUTS`). ``pseudo_labels``: ``None`` runs MaskCut with ``model`` (``maskcut_size``,
    ``n_masks``, ``tau``, ``crf``) on the images (ImageNet: a seeded sample of ``n_images``, None = all, as
    :func:`folder_maskcut`) and writes ``out_dir/maskcut_train.json``; ``"cutler"`` reads CutLER's released
    ``annotations/imagenet_train_fixsize480_tau0.15_N3.json`` under ``root``; a path reads that file (file
    names relative to the training images). A file is read with
    :func:`~nbsupport.data.datasets.imagenet.read_pseudo_labels` (CutLER's swapped sizes fixed, checked
    against the images when a record has no RLE); with ``n_images`` set on ImageNet, a seeded sample of its
    images is kept and written to ``out_dir/pseudo_labels_train.json``. On the synthetic world, MaskCut's
    masks are also scored against the ground truth (``score``)."""
    from nbsupport.data.datasets.base import DatasetLayoutError
    from nbsupport.data.datasets.imagenet import PSEUDO_LABEL_FILE, ImageNetFolder
    from nbsupport.models.backbones import describe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dataset is not None and dataset not in TRAIN_LAYOUTS:
        raise ValueError(f"training dataset {dataset!r}: one of {sorted(TRAIN_LAYOUTS)} or None (synthetic world)")
    if pseudo_labels == RELEASED and dataset != "imagenet":
        raise ValueError(f"pseudo_labels={RELEASED!r} is CutLER's released ImageNet file: it needs dataset='imagenet'")
    if pseudo_labels is None and model is None:
        raise ValueError("pseudo_labels=None runs MaskCut on the training images: it needs a backbone (model)")
    mc = dict(size=maskcut_size, n_masks=n_masks, tau=tau, crf=crf, device=device)
    if dataset is None and root is not None:
        raise ValueError(f"dataset_root {root} is set but dataset is None (the synthetic world): set dataset too")
    if dataset is None:
        from nbsupport.data.scenes import synthetic_coco
        from nbsupport.maskcut import pipeline

        coco = synthetic_coco(n_images, seed, image_size, "train", overlap="allowed")
        if pseudo_labels is None:
            masks = pipeline.dataset_masks(model, coco, progress=progress, **mc)
            data = pipeline.to_coco(coco, masks)
            path = out / "maskcut_train.json"
            path.write_text(json.dumps(data))
            return TrainingLabels(data, path, coco.image_root, f"MaskCut by {describe(model)}", coco,
                                  pipeline.score(coco, masks))  # fmt: skip
        path = Path(pseudo_labels)
        data = read_pseudo_labels(path, coco.image_root, strict=False).data
        return TrainingLabels(data, path, coco.image_root, f"pseudo-labels {path.name} on the synthetic world", coco)
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs dataset_root (layout: {TRAIN_LAYOUTS[dataset]})")
    folder = ImageNetFolder(root)
    if pseudo_labels is None:
        data = folder_maskcut(model, folder, sample_indices(len(folder), n_images, seed), progress=progress, **mc)
        path = out / "maskcut_train.json"
        path.write_text(json.dumps(data))
        source = f"MaskCut by {describe(model)} on ImageNet train ({len(data['images'])} images)"
        return TrainingLabels(data, path, folder.image_root, source)
    path = folder.pseudo_label_path if pseudo_labels == RELEASED else Path(pseudo_labels).expanduser()
    if not path.is_file():
        where = f"CutLER's released {PSEUDO_LABEL_FILE} in {path.parent}" if pseudo_labels == RELEASED else path
        raise DatasetLayoutError(f"pseudo-labels: {where} not found (ImageNet layout: {folder.root}/annotations/)")
    data = read_pseudo_labels(path, folder.image_root, strict=False).data  # warns how many sizes it swapped back
    if n_images is not None and n_images < len(data["images"]):
        data = _subset_images(data, n_images, seed)
        path = out / "pseudo_labels_train.json"
        path.write_text(json.dumps(data))
    what = (
        f"CutLER's released pseudo-labels ({path.name})" if pseudo_labels == RELEASED else f"pseudo-labels {path.name}"
    )
    return TrainingLabels(data, path, folder.image_root, f"{what} on ImageNet train ({len(data['images'])} images)")


#: ``eval_dataset`` names -> how :func:`evaluation_set` names the split in titles.
_EVAL_NAMES = {"coco": "COCO {split}2017", "voc": "PASCAL VOC 2012 {split}"}


def evaluation_set(
    dataset: str | None = None, root=None, split: str = "val", n_images: int | None = None, seed: int = 0,
    image_size: int = 128,
) -> EvaluationSet:  # fmt: skip
    """The images with ground truth the detectors are scored on (class-agnostic, Tables 1-2): ``None`` -> the
    synthetic world's ``split`` (``n_images`` scenes of ``image_size`` px from ``seed``, overlapping objects
    allowed); ``"coco"`` -> COCO 2017 in its official layout under ``root``
    (``annotations/instances_<split>2017.json``, ``<split>2017/``; the thesis: val2017), ``"voc"`` -> PASCAL
    VOC 2012's instances (:func:`nbsupport.data.instances.instance_dataset`); ``n_images``: the first ones by
    image id (None: all)."""
    from nbsupport.data.coco import CocoInstances

    if dataset is None and root is not None:
        raise ValueError(f"eval_root {root} is set but eval_dataset is None (the synthetic world): set it too")
    if dataset is None:
        from nbsupport.data.scenes import synthetic_coco

        coco = synthetic_coco(n_images, seed, image_size, split, overlap="allowed")
        ds = PseudoMaskDataset(coco.ann_file, coco.image_root, train=False)
        return EvaluationSet(coco, ds, f"synthetic world {split} ({len(coco)} scenes)")
    from nbsupport.data.instances import instance_dataset

    if dataset not in _EVAL_NAMES:
        raise ValueError(f"evaluation dataset {dataset!r}: one of {sorted(_EVAL_NAMES)} or None (synthetic world)")
    full = instance_dataset(dataset, root, split, n_images=n_images, seed=seed, size=image_size)
    keep = set(full.image_ids[:n_images])
    src = full.coco.dataset
    data = {
        **src,
        "images": [im for im in src["images"] if im["id"] in keep],
        "annotations": [a for a in src["annotations"] if a["image_id"] in keep],
    }
    coco = CocoInstances.from_data(data, full.image_root, source=str(full.ann_file))
    ds = PseudoMaskDataset(full.ann_file, full.image_root, train=False, data=data)
    return EvaluationSet(coco, ds, f"{_EVAL_NAMES[dataset].format(split=split)} ({len(coco)} images)")
