"""Images with semantic ground truth at the input size (nbsupport.data.segmentation): the synthetic source
shows exactly the scenes the trainer validates on; real labels are nearest-resized with 255 kept; pixels stay
uint8 and are normalised per batch, bit for bit as image_to_tensor."""

import numpy as np
import pytest
import torch
from PIL import Image

from nbsupport.data import scenes
from nbsupport.data.datasets import voc
from nbsupport.data.datasets.ade20k import ADE20K_CLASSES
from nbsupport.data.datasets.ade20k import write_fixture as write_ade20k
from nbsupport.data.datasets.voc import VOC_CLASSES, PascalContext59, voc_colormap
from nbsupport.data.images import image_to_tensor
from nbsupport.data.segmentation import NormalizedImages, open_dataset, resize_labels, segmentation_set


def test_synthetic_source_is_the_trainers_validation_split():
    """Parity with the in-memory renderer: same images (bit for bit) and semantic masks, class names in
    label order, backgrounds as extra names."""
    s = segmentation_set(None, n_images=5, size=48, seed=3, split="val")
    images, semantic = scenes.synthetic_scenes(5, seed=3, size=48, split="val")
    assert torch.equal(s.images, images) and torch.equal(s.semantic, semantic)
    names, bgs = scenes.synthetic_class_names("name")
    assert s.class_names == names and s.background_names == bgs and s.n_classes == 7
    assert s.label_names[0] == "background" and s.label_names[1] == "striped triangle"
    assert s.images.shape == (5, 3, 48, 48) and s.semantic.dtype == torch.int64
    assert s.pixels.dtype == torch.uint8 and s.has_background
    train = segmentation_set(None, n_images=5, size=48, seed=3, split="train")
    assert not torch.equal(train.images, s.images)  # another split, other scenes


def test_resize_labels_nearest_by_hand():
    lab = np.array([[1, 2], [255, 0]])
    np.testing.assert_array_equal(
        resize_labels(lab, 4), [[1, 1, 2, 2], [1, 1, 2, 2], [255, 255, 0, 0], [255, 255, 0, 0]]
    )
    assert resize_labels(lab, 2).dtype == np.int64
    with pytest.raises(ValueError, match="0..255"):
        resize_labels(np.array([[300, 0], [0, 0]]), 4)


@pytest.fixture
def voc_root(tmp_path):
    """Two 8x6 VOC images: a person (15) square with a void (255) top row, and a cat (8) left half."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    cmap = voc_colormap()
    rng = np.random.default_rng(0)
    labels = {"a": np.zeros((6, 8), np.uint8), "b": np.zeros((6, 8), np.uint8)}
    labels["a"][2:4, 2:6] = 15
    labels["a"][0] = 255
    labels["b"][:, :4] = 8
    for name, lab in labels.items():
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(tmp_path / f"JPEGImages/{name}.jpg")
        pal = Image.fromarray(lab, "P")
        pal.putpalette(cmap.flatten().tolist())
        pal.save(tmp_path / f"SegmentationClass/{name}.png")
    return tmp_path, labels


def test_voc_source_resizes_images_and_labels(voc_root):
    root, labels = voc_root
    s = segmentation_set(root, n_images=2, size=16, split="val")
    assert s.class_names == list(VOC_CLASSES[1:]) and s.background_names == [] and s.n_classes == 21
    assert s.images.shape == (2, 3, 16, 16)
    img = Image.open(root / "JPEGImages/a.jpg").convert("RGB")
    assert torch.equal(s.images[0], image_to_tensor(img, 16))  # bit for bit, from the stored uint8
    # nearest neighbour: output pixel (y, x) takes source (floor((y + .5) * 6 / 16), floor((x + .5) * 8 / 16))
    ys, xs = (np.floor((np.arange(16) + 0.5) * n / 16).astype(int) for n in (6, 8))
    for i, name in enumerate("ab"):
        np.testing.assert_array_equal(s.semantic[i].numpy(), labels[name][np.ix_(ys, xs)].astype(np.int64))
    sem = s.semantic.numpy()
    assert (sem[0][:3] == 255).all() and (sem[0][3:] != 255).all()  # void row 0 of 6 -> rows 0-2 of 16
    assert (sem[1][:, :8] == 8).all() and (sem[1][:, 8:] == 0).all()  # the left half stays the left half
    assert s.label_names[15] == "person"


def test_bad_requests(voc_root):
    root, _ = voc_root
    with pytest.raises(ValueError, match="3 images asked for.*has 2"):
        segmentation_set(root, n_images=3, size=16)
    with pytest.raises(ValueError, match="n_images"):
        segmentation_set(None, n_images=0)
    with pytest.raises(FileNotFoundError, match=r"train\.txt"):
        segmentation_set(root, n_images=1, split="train")
    with pytest.raises(ValueError, match="needs root="):
        segmentation_set("voc", n_images=1)
    with pytest.raises(ValueError, match="one of"):
        segmentation_set(42, n_images=1)
    with pytest.raises(ValueError, match=r"unknown dataset 'vocc': names are \['ade20k'"):
        segmentation_set("vocc", n_images=1)


def test_images_are_uint8_normalised_per_batch():
    """The view gives what image_to_tensor gives (same bytes, same arithmetic), per index, slice, iteration or
    as a whole; torch functions see the normalised tensor."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(3)]
    ref = torch.stack([image_to_tensor(a) for a in arrays])
    x = NormalizedImages(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous())
    assert len(x) == 3 and x.shape == (3, 3, 12, 12) and x.ndim == 4 and x.dtype == torch.float32
    assert torch.equal(x[1], ref[1]) and torch.equal(x[1:], ref[1:]) and torch.equal(x.to("cpu"), ref)
    assert all(torch.equal(a, b) for a, b in zip(x, ref))
    assert torch.equal(x, ref) and torch.equal(torch.cat([x[:1], x[1:]]), ref)  # __torch_function__
    assert x.pixels.element_size() == 1 and float(x.mean()) == pytest.approx(float(ref.mean()))
    with pytest.raises(ValueError, match="uint8"):
        NormalizedImages(ref)


def test_named_datasets_and_dataset_objects(tmp_path):
    """A dataset by name + root or as an object; GroupViT's names; a dataset without background (Context-59,
    ADE20K) is shifted to 1..C so that 0 keeps meaning background and never occurs."""
    planted = voc.write_fixture(tmp_path)
    root = planted["root"]["voc"]
    by_path = segmentation_set(root, n_images=2, size=32, split="val")
    by_name = segmentation_set("voc", n_images=2, size=32, split="val", root=root)
    assert torch.equal(by_path.pixels, by_name.pixels) and torch.equal(by_path.semantic, by_name.semantic)
    assert by_name.class_names[10] == "table" and by_name.source == "voc val" and by_name.has_background
    first = planted["splits"]["voc"]["val"][0]
    np.testing.assert_array_equal(by_name.semantic[0].numpy(), resize_labels(planted["masks"]["voc"][first], 32))
    ctx = open_dataset(PascalContext59(planted["root"]["context59"], "train"))
    s = segmentation_set(ctx, n_images=3, size=24)
    assert not s.has_background and s.class_names == list(voc.CONTEXT59_CLASSES) and s.n_classes == 60
    for i, image_id in enumerate(planted["splits"]["context59"]["train"]):
        raw = planted["raw"]["context59"][image_id]  # raw 0 -> 255, k -> k (class k - 1, label k)
        np.testing.assert_array_equal(s.semantic[i].numpy(), resize_labels(np.where(raw == 0, 255, raw), 24))
    assert (s.semantic != 0).all()
    ade = write_ade20k(tmp_path)
    a = segmentation_set("ade20k", n_images=4, size=16, root=ade["root"])
    assert a.class_names == list(ADE20K_CLASSES) and a.label_names[150] == "flag" and not a.has_background
    assert (a.semantic[0, -1] == 150).all()  # the planted "flag" strip (raw 150) along the bottom
    with pytest.raises(ValueError, match="5 images asked for.*has 4"):
        segmentation_set("ade20k", n_images=5, size=16, root=ade["root"])


def test_full_resolution_reads_each_image_again_at_its_original_size(tmp_path):
    """What GroupViT's protocol scores against: the original image (normalised as image_to_tensor) and the
    planted original-size labels; Context-59 shifted like the resized set; the synthetic world's scenes are
    their own full resolution."""
    planted = voc.write_fixture(tmp_path)
    root = planted["root"]["voc"]
    s = segmentation_set("voc", n_images=3, size=16, split="val", root=root)
    for i, image_id in enumerate(planted["splits"]["voc"]["val"][:3]):
        img, sem = s.full_resolution(i)
        h, w = planted["sizes"][image_id]
        assert img.shape == (3, h, w) and sem.shape == (h, w) and sem.dtype == torch.int64 and (h, w) != (16, 16)
        np.testing.assert_array_equal(sem.numpy(), planted["masks"]["voc"][image_id])
        assert torch.equal(img, image_to_tensor(Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB")))
    ctx = segmentation_set("context59", n_images=2, size=24, split="train", root=planted["root"]["context59"])
    raw = planted["raw"]["context59"][planted["splits"]["context59"]["train"][1]]
    np.testing.assert_array_equal(ctx.full_resolution(1)[1].numpy(), np.where(raw == 0, 255, raw))
    syn = segmentation_set(None, n_images=2, size=32, seed=1)
    img, sem = syn.full_resolution(1)
    assert syn.dataset is None and torch.equal(img, syn.images[1]) and torch.equal(sem, syn.semantic[1])
    with pytest.raises(IndexError, match="image 3 of a set of 3"):
        s.full_resolution(3)
