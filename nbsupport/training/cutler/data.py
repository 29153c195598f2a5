"""CutLER's training data: COCO-format pseudo-masks with bad-input handling, an endless seeded sampler that
resumes exactly, and aspect-ratio grouped batches.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

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
