"""Images with semantic ground truth at the input size (nbsupport.data.segmentation): the synthetic source
shows exactly the scenes the trainer validates on; VOC labels are nearest-resized with 255 kept."""

import numpy as np
import pytest
import torch
from PIL import Image

from nbsupport.data import scenes
from nbsupport.data.images import image_to_tensor
from nbsupport.data.segmentation import resize_labels, segmentation_set
from nbsupport.data.voc import VOC_CLASSES, voc_colormap


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
    torch.testing.assert_close(s.images[0], image_to_tensor(img, 16))
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
    with pytest.raises(FileNotFoundError, match="VOC root"):
        segmentation_set(root, n_images=1, split="train")
