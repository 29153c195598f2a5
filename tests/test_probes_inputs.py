"""What the probes read: the final-LayerNorm token facet, the 300-epoch DINO ViT-S/8 name and its fixture,
STEGO's preprocessing and label ids of the probe datasets, the optional dense CRF, and the whole study of
notebook 09 on a tiny synthetic set."""

import numpy as np
import pytest
import torch
from PIL import Image

from nbsupport.analysis.probes import crf, protocol, tables
from nbsupport.models import backbones, features
from nbsupport.models import fixtures as fx


def test_norm_token_is_the_final_layernorm_of_the_block_output():
    model = backbones.load("random_tiny8")
    x = torch.randn(2, 3, 32, 32)
    got = features.extract(model, x, "norm_token", -1)
    with torch.no_grad():
        ref = model.forward_features(x)[:, 1:].reshape(2, 4, 4, -1)  # timm: blocks then the final norm
    assert torch.allclose(got, ref, atol=1e-5)
    plain = features.extract(model, x, "token", -1)
    assert not torch.allclose(plain, got, atol=1e-2)
    both = features.extract_many(model, x, [("norm_token", 1), ("token", 1)])
    assert torch.allclose(both[("norm_token", 1)], model.norm(both[("token", 1)]), atol=1e-5)


def test_groupvit_sources_give_one_token_per_patch():
    from nbsupport.analysis.probes import cache as fcache

    x = torch.randn(2, 3, 32, 32)
    stage1 = fcache.load_source("groupvit:small")
    groups = fcache.load_source("groupvit_groups:small")
    a, b = stage1.fn(x), groups.fn(x)
    assert a.shape == b.shape == (2, 4, 4, 96) and stage1.patch == 8
    assert stage1.fingerprint == groups.fingerprint and "final groups" in groups.description
    assert not a.requires_grad and not b.requires_grad
    # final groups: every patch's token is a mixture of the 4 final group tokens of the small config
    rank = torch.linalg.matrix_rank
    assert rank(b[0].reshape(16, -1), rtol=1e-4) <= 4 < rank(a[0].reshape(16, -1), rtol=1e-4)


def test_dino_vits8_300ep_release_and_fixture(tmp_path, monkeypatch):
    off = backbones.OFFICIAL["dino_vits8_300ep"]
    assert off.url == (
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth"
    )
    assert off.arch == backbones.OFFICIAL["dino_vits8"].arch and "dino_vits8_300ep" in fx.DINO_NAMES
    (path,) = fx.write_official_weights(tmp_path, names=["dino_vits8_300ep"]).values()
    assert path == tmp_path / "dino" / "dino_deitsmall8_300ep_pretrain.pth"
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    model = backbones.load("dino_vits8_300ep")
    assert model.nbs_info["fixture"] and not model.nbs_info["pretrained"]
    assert backbones.describe(model).startswith("DINO (300 epochs) ViT-S/8") and "fixture" in backbones.describe(model)
    assert features.extract(model, torch.randn(1, 3, 16, 16), "norm_token").shape == (1, 2, 2, 384)


def test_resize_crop_is_shorter_side_then_centre():
    img = np.zeros((20, 40, 3), dtype=np.uint8)  # H 20, W 40
    img[:, 10:30] = 200
    mask = np.zeros((20, 40), dtype=np.int64)
    mask[:, :10], mask[:, 30:] = 1, 255
    px, lab = protocol.resize_crop(Image.fromarray(img), mask, 10)  # -> 10 x 20, crop columns 5..15
    assert px.shape == (3, 10, 10) and lab.shape == (10, 10) and lab.dtype == torch.uint8
    assert (lab == 0).all() and px.float().mean() > 190  # the side bands (label 1 and 255) are cropped away


def test_probe_data_label_ids(tmp_path):
    from nbsupport.data.datasets import cocostuff

    root = cocostuff.write_fixture(tmp_path)["root"]
    d = protocol.probe_data("cocostuff27", root, "val", None, 32)
    assert d.n_classes == 27 and d.pixels.shape[1:] == (3, 32, 32) and d.labels.shape[1:] == (32, 32)
    vals = set(d.labels.unique().tolist())
    assert vals <= set(range(27)) | {255} and len(vals - {255}) > 3
    syn = protocol.probe_data("synthetic", n_images=3, size=32, split="val")
    assert syn.n_classes == 7 and syn.class_names[0] == "background"  # K = 6 object classes + background
    assert set(syn.labels.unique().tolist()) <= set(range(7)) | {255}
    with pytest.raises(ValueError, match="needs its root"):
        protocol.probe_data("potsdam3", None)


@pytest.mark.skipif(not crf.crf_available(), reason="pydensecrf is not installed: the CRF is optional")
def test_dense_crf_snaps_noisy_probabilities_to_colour_edges():
    rng = np.random.default_rng(0)
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    image[:, 12:] = 255
    truth = (np.arange(24)[None, :] >= 12).repeat(24, 0).astype(int)
    p1 = np.clip(truth * 0.6 + 0.2 + rng.normal(0, 0.25, (24, 24)), 0.01, 0.99)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    before = (probs.argmax(0) == truth).mean()
    after = (crf.dense_crf(image, probs).argmax(0) == truth).mean()
    assert before < 0.95 and after > 0.99
    with pytest.raises(ValueError, match="does not match"):
        crf.dense_crf(image[:10], probs)
    mirrored = (np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(probs[:, :, ::-1]))
    batch = crf.dense_crf_many(np.stack([image, mirrored[0]]), np.stack([probs, mirrored[1]]), workers=2)
    assert np.allclose(batch[0], crf.dense_crf(image, probs)) and np.allclose(batch[1], crf.dense_crf(*mirrored))
    # the cluster probe's CRF path: two planted clusters whose patch grid is coarser than the colour edge
    from nbsupport.analysis.probes import cluster

    feats = torch.zeros(1, 3, 3, 2)
    feats[..., 0], feats[:, :, 2:, 1] = 1.0, 2.0  # patch column 2 is class 1
    labels = torch.from_numpy(truth[None]).long()  # classes split at pixel column 12, inside patch column 1
    img = torch.from_numpy(image).permute(2, 0, 1)[None]
    opts = {"kmeans": {}}
    plain = cluster.cluster_probe(feats, labels, 2, ["kmeans"], ["count"], options=opts).rows[0]["accuracy"]
    refined = cluster.cluster_probe(feats, labels, 2, ["kmeans"], ["count"], options=opts, images=img).rows[0]
    assert plain < 95.0 and refined["accuracy"] > plain


def test_run_probes_on_a_tiny_synthetic_set(tmp_path):
    data = protocol.probe_datasets(["synthetic"], n_images=2, n_train=2, size=32)
    rep = protocol.run_probes(
        ["random_tiny8"],
        data,
        seeds=(0, 1),
        cluster_options={"learned": {"epochs": 1}},
        recipe="croc_voc",
        recipe_overrides={"epochs": 1},
        cache=tmp_path,
        n_shown=1,
        log=lambda m: None,
    )
    assert len(rep.cluster) == 2 * 2 * 2 and len(rep.linear) == 1  # estimators x criteria x seeds
    assert rep.linear[0]["steps"] == 1 and rep.settings["recipe_diff"] == {"epochs": 1}
    assert rep.predictions[("synthetic", "random_tiny8", "linear")].shape == (1, 32, 32)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # val and train features
    t = tables.paper_table(rep)
    assert t.loc[0, "ours"].startswith("32 px, norm_token L-1")
    assert rep.settings["grid"][("synthetic", "random_tiny8")] == (4, 4)
