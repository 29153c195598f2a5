"""Backbone loading: official key layout, cache, offline errors, safetensors, bad checkpoints."""

import shutil
import urllib.error

import pytest
import torch

from nbsupport.models import backbones, checkpoints, features


def official_layout(dim=384, depth=12, patch=8, img=224, seed=0):
    """A state dict written key by key in the layout of DINO's released ``*_pretrain.pth`` files."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    n = (img // patch) ** 2
    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, n + 1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + r(dim),
                p + "norm1.bias": r(dim),
                p + "attn.qkv.weight": r(3 * dim, dim),
                p + "attn.qkv.bias": r(3 * dim),
                p + "attn.proj.weight": r(dim, dim),
                p + "attn.proj.bias": r(dim),
                p + "norm2.weight": 1 + r(dim),
                p + "norm2.bias": r(dim),
                p + "mlp.fc1.weight": r(4 * dim, dim),
                p + "mlp.fc1.bias": r(4 * dim),
                p + "mlp.fc2.weight": r(dim, 4 * dim),
                p + "mlp.fc2.bias": r(dim),
            }
        )
    sd["norm.weight"], sd["norm.bias"] = 1 + r(dim), r(dim)
    return sd


@pytest.fixture(scope="module")
def vits8_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "dino_deitsmall8_pretrain.pth"
    torch.save(official_layout(), path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NBSUPPORT_OFFLINE", raising=False)
    return tmp_path / "cache"


def test_local_official_file_loads_strictly(vits8_file):
    model = backbones.load(vits8_file)
    info = model.nbs_info
    assert (info["patch_size"], info["embed_dim"], info["depth"], info["num_heads"]) == (8, 384, 12, 6)
    sd = official_layout()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k])  # every key present, nothing extra (load was strict)
    assert set(model.state_dict()) == set(sd)
    assert not model.training


def test_official_name_uses_cache_and_pins_hash(vits8_file, cache, monkeypatch):
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        shutil.copy(vits8_file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    off = backbones.OFFICIAL["dino_vits8"]
    monkeypatch.setitem(backbones.OFFICIAL, "dino_vits8", backbones.Official(off.arch, off.file, None))
    m1 = backbones.load("dino_vits8")
    m2 = backbones.load("dino_vits8")  # second time from the cache
    assert calls == [off.url]
    assert backbones.expected_path("dino_vits8").parent == cache / "dino"
    assert (cache / "dino" / "dino_deitsmall8_pretrain.pth.sha256").is_file()
    assert backbones.describe(m1) == "DINO ViT-S/8" and m1.nbs_info["pretrained"]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(features.extract(m1, x), features.extract(m2, x))
    # a file that changed after download is refused
    path = backbones.expected_path("dino_vits8")
    with open(path, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(checkpoints.CheckpointError, match="sha256"):
        backbones.load("dino_vits8")


def test_size_check(vits8_file, cache):
    dst = backbones.expected_path("dino_vits8")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(vits8_file, dst)  # not the 86,728,949 bytes of the real file
    with pytest.raises(checkpoints.CheckpointError, match="86728949"):
        backbones.load("dino_vits8")


def test_offline_error_names_url_and_path(cache, monkeypatch):
    def no_network(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(checkpoints.WeightsUnavailableError) as e:
        backbones.load("dino_vitb8")
    msg = str(e.value)
    assert "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth" in msg
    assert str(cache / "dino" / "dino_vitbase8_pretrain.pth") in msg
    assert not (cache / "dino" / "dino_vitbase8_pretrain.pth").exists()


def test_offline_env_attempts_no_download(cache, monkeypatch, no_network):
    """NBSUPPORT_OFFLINE=1: the loader never calls the network and names the URL and the cache path."""
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    with pytest.raises(checkpoints.WeightsUnavailableError) as e:
        backbones.load("dino_vits16")
    msg = str(e.value)
    assert backbones.OFFICIAL["dino_vits16"].url in msg and str(backbones.expected_path("dino_vits16")) in msg
    assert "random_vits8" in msg


def test_full_training_checkpoint_teacher_is_unwrapped(tmp_path):
    sd = official_layout(dim=64, depth=2, patch=16, img=64)
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher["module.head.last_layer.weight_g"] = torch.ones(10, 1)
    path = tmp_path / "full.pth"
    torch.save({"teacher": teacher, "epoch": 3}, path)
    model = backbones.load(path)
    assert model.nbs_info["depth"] == 2 and model.nbs_info["patch_size"] == 16
    torch.testing.assert_close(model.cls_token, sd["cls_token"])


def test_safetensors_roundtrip_keeps_heads(tmp_path):
    tiny = backbones.load("random_tiny8")
    path = backbones.save_safetensors(tiny, tmp_path / "tiny.safetensors", description="test tiny")
    back = backbones.load(path)
    assert back.nbs_info["num_heads"] == 3  # 96 // 64 would be wrong: metadata carries it
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(features.extract(back, x, "attn", 1), features.extract(tiny, x, "attn", 1))


def test_random_models_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = backbones.load("random_tiny8")
    after = torch.rand(1)
    b = backbones.load("random_tiny8")
    assert torch.equal(before, after)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert "random-init" in backbones.describe(a) and not a.nbs_info["pretrained"]


class Evil:
    """A pickled object: weights_only loading must refuse it."""


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.load("dino_vits9")
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(checkpoints.CheckpointError, match="not a ViT"):
        backbones.load(bad)
    pickled = tmp_path / "object.pth"
    torch.save({"obj": Evil()}, pickled)
    with pytest.raises(checkpoints.CheckpointError, match="weights_only"):
        backbones.load(pickled)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(checkpoints.CheckpointError, match="broken.safetensors"):
        backbones.load(broken)
    sd = official_layout(dim=64, depth=1, patch=16, img=64)
    sd.pop("blocks.0.attn.proj.bias")
    missing = tmp_path / "missing.pth"
    torch.save(sd, missing)
    with pytest.raises(checkpoints.CheckpointError, match="attn.proj.bias"):
        backbones.load(missing)
    with pytest.raises(FileNotFoundError):
        backbones.load(tmp_path / "nope.pth")


def test_reserved_shipped_name_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(backbones.SHIPPED, "tiny_dino_synth", "weights/definitely_missing.safetensors")
    with pytest.raises(checkpoints.WeightsUnavailableError, match="definitely_missing.safetensors.*random_vits8"):
        backbones.load("tiny_dino_synth")


def test_shipped_tiny_dino_loads_by_name_offline():
    """The tiny DINO ships in data/weights: it loads by name, has the recipe's architecture (4 blocks of
    width 128, patch 8), runs at 128 px (position embeddings interpolated from its 64-px training grid),
    carries its training command, and is not its random-init twin."""
    from safetensors import safe_open

    from nbsupport.core import paths
    from nbsupport.models import features

    m = backbones.load("tiny_dino_synth")
    info = m.nbs_info
    assert (info["patch_size"], info["embed_dim"], info["depth"], info["num_heads"]) == (8, 128, 4, 4)
    assert info["pretrained"] and "tiny DINO" in backbones.describe(m)
    keys = features.extract(m, torch.rand(1, 3, 128, 128), "key", -1)
    assert keys.shape == (1, 16, 16, 128) and torch.isfinite(keys).all()
    twin = backbones.random_like(m)
    assert not torch.allclose(m.blocks[0].attn.qkv.weight, twin.blocks[0].attn.qkv.weight)
    with safe_open(str(paths.data_dir() / backbones.SHIPPED["tiny_dino_synth"]), "pt") as f:
        meta = f.metadata()
    assert meta["command"].startswith("python -m nbsupport dino train") and "--scene-size 128" in meta["command"]
