"""DAVIS-2017 semi-supervised video object segmentation, read as the davis2017-evaluation toolkit reads it
(``davis2017/davis.py``): ``DAVIS/JPEGImages/480p/<video>/<frame>.jpg``, palette PNGs
``DAVIS/Annotations/480p/<video>/<frame>.png`` (index = object id, 0 background, 255 void), video names in
``DAVIS/ImageSets/2017/<split>.txt``.

Conventions taken from the toolkit: frames are the sorted ``*.jpg`` names; the objects of a video are
``1 .. max id`` of its first annotation with void set to background (``num_objects``); ``train`` and
``val`` annotate every frame, ``test-dev`` / ``test-challenge`` only the first one (the semi-supervised
task's given masks). J and F live elsewhere.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from nbsupport.data.datasets.base import IGNORE, DatasetLayoutError, LabelError, read_label_png, read_split
from nbsupport.data.images import load_image

SPLITS = ("train", "val", "test-dev", "test-challenge")
FULLY_ANNOTATED = ("train", "val")
VOID = IGNORE  # the toolkit's VOID_LABEL
LAYOUT = (
    "DAVIS/{JPEGImages/<res>/<video>/<frame>.jpg, Annotations/<res>/<video>/<frame>.png (palette), "
    "ImageSets/2017/{train,val}.txt}"
)


class DavisVideo:
    """One video: ``frame_ids`` in order, ``frame(i)`` (PIL RGB), ``annotation(i)`` (int64 ``[H, W]`` object
    ids, 0 background, 255 void), ``num_objects`` / ``object_ids`` from the first frame's annotation."""

    def __init__(self, name: str, image_dir: Path, mask_dir: Path, all_annotated: bool):
        self.name = name
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        if not self.image_dir.is_dir():
            raise DatasetLayoutError(f"DAVIS video {name!r}: frame folder {self.image_dir} not found; layout: {LAYOUT}")
        self.frame_ids = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
        if not self.frame_ids:
            raise DatasetLayoutError(f"DAVIS video {name!r}: no .jpg frames in {self.image_dir}")
        annotated = {p.stem for p in self.mask_dir.glob("*.png")} if self.mask_dir.is_dir() else set()
        extra = sorted(annotated - set(self.frame_ids))
        if extra:
            raise DatasetLayoutError(
                f"DAVIS video {name!r}: annotation {self.mask_dir / (extra[0] + '.png')} has no frame "
                f"{self.image_dir / (extra[0] + '.jpg')}"
            )
        required = self.frame_ids if all_annotated else self.frame_ids[:1]
        missing = [f for f in required if f not in annotated]
        if missing:
            which = "every frame" if all_annotated else "the first frame"
            raise DatasetLayoutError(
                f"DAVIS video {name!r}: {len(missing)} frame(s) lack an annotation, e.g. "
                f"{self.mask_dir / (missing[0] + '.png')} ({which} must be annotated in this split)"
            )
        self.annotated = [f in annotated for f in self.frame_ids]

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __repr__(self) -> str:
        return f"DavisVideo({self.name!r}, frames={len(self)}, objects={self.num_objects})"

    def _index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"DAVIS video {self.name!r}: frame index {i} out of range for {len(self)} frames")
        return i % len(self)

    def frame_path(self, i: int) -> Path:
        return self.image_dir / f"{self.frame_ids[self._index(i)]}.jpg"

    def annotation_path(self, i: int) -> Path:
        return self.mask_dir / f"{self.frame_ids[self._index(i)]}.png"

    def frame(self, i: int) -> Image.Image:
        return load_image(self.frame_path(i))

    def has_annotation(self, i: int) -> bool:
        return self.annotated[self._index(i)]

    def annotation(self, i: int) -> np.ndarray:
        """Object ids of frame ``i`` (int64 ``[H, W]``), checked: a palette/grey PNG of the frame's size whose
        ids are 0 .. ``num_objects`` or 255."""
        path = self.annotation_path(i)
        if not self.has_annotation(i):
            raise DatasetLayoutError(
                f"DAVIS video {self.name!r}: frame {self.frame_ids[self._index(i)]} has no annotation {path}"
            )
        ids = read_label_png(path)
        with Image.open(self.frame_path(i)) as im:
            w, h = im.size
        if ids.shape != (h, w):
            raise LabelError(
                f"{path}: annotation is {ids.shape[1]}x{ids.shape[0]} px but frame {self.frame_path(i)} is {w}x{h}"
            )
        limit = self._first_max(ids) if self._index(i) == 0 else self.num_objects
        bad = (ids != VOID) & ((ids < 0) | (ids > limit))
        if bad.any():
            vals = sorted(set(np.unique(ids[bad]).tolist()))[:5]
            raise LabelError(
                f"{path}: object ids {vals} are not among the video's objects 1..{limit} (first frame) or {VOID} void"
            )
        return ids

    @staticmethod
    def _first_max(ids: np.ndarray) -> int:
        objects = ids[(ids != VOID) & (ids > 0)]
        return int(objects.max()) if objects.size else 0

    @cached_property
    def num_objects(self) -> int:
        """The toolkit's object count: the largest id of the first annotation, void counted as background."""
        return self._first_max(self.annotation(0))

    @property
    def object_ids(self) -> list[int]:
        return list(range(1, self.num_objects + 1))


class Davis2017:
    """The videos of one DAVIS-2017 split: ``ds.videos`` (names in the split file's order), ``ds[i]`` or
    ``ds["bear"]`` -> :class:`DavisVideo`, iteration over the videos.

    ``root`` is the ``DAVIS`` folder (the one holding ``JPEGImages``, ``Annotations``, ``ImageSets``).
    Every listed video must have its frame folder, and in ``train`` / ``val`` an annotation for every frame.
    """

    def __init__(self, root, split: str = "val", resolution: str = "480p"):
        self.root = Path(root).expanduser()
        self.split, self.resolution = split, resolution
        if split not in SPLITS:
            raise ValueError(f"DAVIS-2017: split must be one of {SPLITS}, got {split!r}")
        if not self.root.is_dir():
            raise DatasetLayoutError(f"DAVIS-2017: root {self.root} is not a folder; expected layout: {LAYOUT}")
        self.videos = read_split(self.root / "ImageSets" / "2017" / f"{split}.txt", LAYOUT)
        image_root = self.root / "JPEGImages" / resolution
        mask_root = self.root / "Annotations" / resolution
        for folder in (image_root, mask_root):
            if not folder.is_dir():
                raise DatasetLayoutError(f"DAVIS-2017: folder {folder} not found; expected layout: {LAYOUT}")
        self._videos = {
            v: DavisVideo(v, image_root / v, mask_root / v, all_annotated=split in FULLY_ANNOTATED) for v in self.videos
        }

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self):
        return (self._videos[v] for v in self.videos)

    def __getitem__(self, key) -> DavisVideo:
        if isinstance(key, str):
            if key not in self._videos:
                raise KeyError(f"DAVIS-2017 {self.split}: no video {key!r} (videos: {self.videos[:5]}...)")
            return self._videos[key]
        if not -len(self) <= key < len(self):
            raise IndexError(f"DAVIS-2017 {self.split}: index {key} out of range for {len(self)} videos")
        return self._videos[self.videos[key]]

    def __repr__(self) -> str:
        return f"Davis2017(root={str(self.root)!r}, split={self.split!r}, videos={len(self)})"


# -- fixture


def davis_palette() -> list[int]:
    """The PASCAL VOC colour map DAVIS uses for its palette PNGs (id k's bits spread over R, G, B)."""
    pal = []
    for k in range(256):
        r = g = b = 0
        c = k
        for bit in range(7, -1, -1):
            r, g, b = r | ((c & 1) << bit), g | (((c >> 1) & 1) << bit), b | (((c >> 2) & 1) << bit)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_fixture(base, seed: int = 0) -> dict:
    """A tiny ``DAVIS`` tree under ``base``: val = ``bike-packing`` (landscape) and ``dogs-jump`` (portrait),
    4 frames each with 2 objects (a box and a disc) still in frames 0-1 and moving in frames 2-3, a void
    ring round object 1 in frame 2; train = ``bear``, 3 frames, 1 object. Palette PNGs, JPEG frames.

    Returns ``root`` (the ``DAVIS`` folder), ``videos`` (split -> names in file order), ``frames`` (video ->
    frame ids), ``num_objects``, ``annotations`` (video -> planted int arrays per frame), ``sizes`` (video ->
    (H, W)) and ``centres`` (video -> per frame, per object the planted (y, x) centre).
    """
    rng = np.random.default_rng(seed)
    root = Path(base) / "DAVIS"
    specs = {"bike-packing": ((36, 48), 2, 4), "dogs-jump": ((48, 32), 2, 4), "bear": ((30, 40), 1, 3)}
    splits = {"val": ["dogs-jump", "bike-packing"], "train": ["bear"]}
    palette = davis_palette()
    out = {
        "root": root,
        "videos": splits,
        "frames": {},
        "num_objects": {},
        "annotations": {},
        "sizes": {},
        "centres": {},
    }
    for video, ((h, w), n_obj, n_frames) in specs.items():
        yy, xx = np.mgrid[:h, :w]
        bg = rng.integers(40, 90, 3)
        colours = rng.integers(120, 256, (n_obj + 1, 3))
        start = [
            (int(rng.integers(6, h // 2)), int(rng.integers(6, w // 2))),
            (int(rng.integers(h // 2, h - 8)), int(rng.integers(w // 2, w - 8))),
        ]
        frames, anns, centres = [f"{t:05d}" for t in range(n_frames)], [], []
        for t, fid in enumerate(frames):
            shift = max(0, t - 1) * 2  # frames 0 and 1 still, then 2 px per frame
            ann = np.zeros((h, w), np.uint8)
            cs = []
            for k in range(n_obj):
                cy, cx = start[k][0] + (shift if k == 0 else -shift), start[k][1] + shift
                cs.append((cy, cx))
                if k == 0:
                    ann[max(cy - 4, 0) : cy + 4, max(cx - 5, 0) : cx + 5] = 1
                else:
                    ann[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 2
            if t == 2 and n_obj == 2:
                ring = (np.abs(yy - cs[0][0]) == 5) & (np.abs(xx - cs[0][1]) <= 6)
                ann[ring & (ann == 0)] = VOID
            obj = (ann > 0) & (ann != VOID)
            img = np.where(obj[..., None], colours[np.where(obj, ann, 0)], bg) + rng.integers(-6, 7, (h, w, 3))
            for sub in ("JPEGImages", "Annotations"):
                (root / sub / "480p" / video).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / "JPEGImages" / "480p" / video / f"{fid}.jpg", quality=95
            )
            pim = Image.fromarray(ann, "P")
            pim.putpalette(palette)
            pim.save(root / "Annotations" / "480p" / video / f"{fid}.png")
            anns.append(ann.astype(np.int64))
            centres.append(cs)
        out["frames"][video], out["num_objects"][video] = frames, n_obj
        out["annotations"][video], out["sizes"][video], out["centres"][video] = anns, (h, w), centres
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(n + "\n" for n in names))
    return out
