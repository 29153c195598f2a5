"""Official-layout checkpoints with random weights (models.fixtures): written where the loaders look, loaded
offline and strictly through the real-weights path, labelled as fixtures, refused when altered, reproducible."""

import collections
import hashlib
import json
import pickle
import shutil
import struct
import zipfile

import pytest
import torch

from nbsupport.models import backbones, checkpoints, features
from nbsupport.models import fixtures as fx
from nbsupport.models import groupvit as gv

SMALL_DINO = ["dino_vits16", "dino_vits8"]
LARGE_DINO = ["dino_vitb16", "dino_vitb8"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """All eleven releases written once (about 15 s here, 2.3 GB)."""
    root = tmp_path_factory.mktemp("weights")
    fx.write_official_weights(root)
    return root


@pytest.fixture
def offline(cache, monkeypatch, no_network):
    """NBSUPPORT_CACHE at the fixture folder, NBSUPPORT_OFFLINE=1, and a network that must not be used."""

    monkeypatch.setenv("NBSUPPORT_CACHE", str(cache))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    return cache


def copy_release(src_cache, dst_cache, name):
    """Copy one fixture with its sidecars into another cache folder; returns the new checkpoint path."""
    src, dst = fx.target_path(name, src_cache), fx.target_path(name, dst_cache)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for a, b in ((src, dst), (checkpoints.sidecar(src), checkpoints.sidecar(dst))):
        shutil.copy(a, b)
    shutil.copy(checkpoints.source_sidecar(src), checkpoints.source_sidecar(dst))
    return dst


def test_files_are_where_the_loaders_look(cache, offline):
    paths = fx.write_official_weights(cache)  # everything there already: reused
    assert set(paths) == set(fx.NAMES)
    for name in fx.DINO_NAMES:
        assert (
            paths[name] == backbones.expected_path(name) == cache / "dino" / backbones.OFFICIAL[name].url.split("/")[-1]
        )
    for name in fx.DINOV2_NAMES:  # picked up by default: what `python -m nbsupport fixtures` writes
        assert (
            paths[name]
            == backbones.expected_path(name)
            == cache / "dinov2" / backbones.release(name).file.split("/")[1]
        )
    for name in fx.GROUPVIT_NAMES:
        assert paths[name] == gv.weights_path(name) == cache / "groupvit" / gv.URLS[name].split("/")[-1]
    for name, path in paths.items():
        src = checkpoints.fixture_marker(path)
        assert src["kind"] == "fixture" and src["name"] == name and src["seed"] == 0
        assert src["sha256"] == checkpoints.sha256(path) == checkpoints.sidecar(path).read_text().strip()
        assert src["bytes"] == path.stat().st_size and "NOT the release" in src["note"]
    # the release's pinned size (dino_vits8: 86,728,949 bytes) does not apply to the fixture, which differs
    assert paths["dino_vits8"].stat().st_size != backbones.OFFICIAL["dino_vits8"].size


def _arch(name):
    return backbones.release(name).arch


@pytest.mark.parametrize("name", SMALL_DINO + [pytest.param(n, marks=pytest.mark.slow) for n in LARGE_DINO])
def test_dino_fixture_loads_offline_strictly(offline, name):
    path = backbones.expected_path(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    arch = _arch(name)
    assert type(sd) is dict and all(v.dtype == torch.float32 for v in sd.values())
    assert sd["pos_embed"].shape == (1, (224 // arch.patch_size) ** 2 + 1, arch.embed_dim)
    assert sd["patch_embed.proj.weight"].shape == (arch.embed_dim, 3, arch.patch_size, arch.patch_size)
    assert len(sd) == 4 + 12 * 12 + 2 and not any(k.startswith(("head", "module", "backbone")) for k in sd)
    model = backbones.load(name)
    info = model.nbs_info
    size = {384: "S", 768: "B"}[arch.embed_dim]
    assert info["description"] == f"DINO ViT-{size}/{arch.patch_size} (random weights, fixture)"
    assert info["fixture"] is True and info["pretrained"] is False
    assert backbones.describe(model).endswith("(random weights, fixture)")
    msd = model.state_dict()
    assert set(msd) == set(sd)  # strict: no missing, no unexpected keys
    for k, v in sd.items():
        assert torch.equal(msd[k], v), k
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    keys = features.extract(model, x, facet="key", layer=11)
    assert keys.shape == (2, 64 // arch.patch_size, 96 // arch.patch_size, arch.embed_dim)
    assert torch.isfinite(keys).all() and keys.std() > 0.1  # random, but not degenerate


@pytest.mark.parametrize(
    "name",
    ["dinov2_vits14", "dinov2_vits14_reg"]
    + [pytest.param(n, marks=pytest.mark.slow) for n in ["dinov2_vitb14", "dinov2_vitb14_reg"]],
)
def test_dinov2_fixture_loads_offline_strictly(offline, name):
    path = backbones.expected_path(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    arch, reg = _arch(name), name.endswith("_reg")
    assert type(sd) is dict and all(v.dtype == torch.float32 for v in sd.values())
    assert sd["pos_embed"].shape == (1, 37 * 37 + 1, arch.embed_dim) and sd["mask_token"].shape == (1, arch.embed_dim)
    assert ("register_tokens" in sd) == reg and sd["blocks.11.ls1.gamma"].shape == (arch.embed_dim,)
    assert len(sd) == 5 + reg + 12 * 14 + 2
    model = backbones.load(name)
    size = {384: "S", 768: "B"}[arch.embed_dim]
    desc = f"DINOv2 ViT-{size}/14" + (" + registers" if reg else "") + " (random weights, fixture)"
    assert model.nbs_info["description"] == desc and model.nbs_info["fixture"] and not model.nbs_info["pretrained"]
    msd = model.state_dict()
    for k, v in sd.items():
        if k.startswith("blocks."):
            assert torch.equal(msd[k], v), k
    x = torch.randn(2, 3, 70, 98, generator=torch.Generator().manual_seed(0))
    keys = features.extract(model, x, facet="key", layer=11)
    assert keys.shape == (2, 5, 7, arch.embed_dim)
    assert torch.isfinite(keys).all() and keys.std() > 0.1


def test_groupvit_fixtures_load_offline_strictly(offline):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tok = gv.tokenizer()
    embeds = {}
    for name in fx.GROUPVIT_NAMES:
        obj = checkpoints.read_checkpoint(gv.weights_path(name))
        sd = obj["model"]
        expected = set(gv.GroupViT(gv.CONFIGS[name]).state_dict())
        # yfcc was trained with multi_label 3 (its own multi-label scale), RedCaps with multi_label 0 (none)
        if name.endswith("yfcc_30e"):
            assert set(sd) == expected
        else:
            assert set(sd) == expected - {"multi_label_logit_scale"}
        assert sd["img_encoder.pos_embed"].shape == (1, 196, 384)
        assert sd["img_encoder.layers.0.group_token"].shape == (1, 64, 384)
        assert sd["img_encoder.layers.1.group_projector.1.fc2.weight"].shape == (8, 192)
        assert sd["text_encoder.token_embedding.weight"].shape == (49408, 256)
        assert sd["img_projector.linear_hidden.0.weight"].shape == (4096, 384, 1)
        assert sd["text_projector.linear_hidden.1.num_batches_tracked"].dtype == torch.int64
        torch.testing.assert_close(sd["logit_scale"], torch.tensor(2.659260036932778))
        model = gv.load(name)
        info = model.nbs_info
        assert info == {
            "name": name,
            "pretrained": False,
            "fixture": True,
            "description": f"GroupViT {name} (random weights, fixture)",
        }
        msd = model.state_dict()
        for k, v in sd.items():
            assert torch.equal(msd[k], v), k
        with torch.no_grad():
            out = model.encode_image(x)
            text = model.encode_text(tok(["a photo of a cat.", "a photo of a dog."]))
        assert out.grid == (14, 14) and out.attn.shape == (1, 8, 196)
        assert out.image_embeds.shape == (1, 256) and text.shape == (2, 256)
        assert torch.isfinite(out.image_embeds).all() and torch.isfinite(text).all()
        embeds[name] = out.image_embeds
    assert not torch.allclose(*embeds.values())  # two releases, two sets of random weights


def test_groupvit_fixture_needs_the_restricted_unpickler(cache):
    path = fx.target_path("group_vit_gcc_yfcc_30e", cache)
    with pytest.raises(pickle.UnpicklingError, match=r"omegaconf\.dictconfig\.DictConfig"):
        torch.load(path, weights_only=True)
    with pytest.raises(ModuleNotFoundError, match="omegaconf"):  # the class lives in a package not installed
        torch.load(path, weights_only=False)
    obj = checkpoints.read_checkpoint(path)
    top = ["model", "optimizer", "lr_scheduler", "metrics", "epoch", "config", "max_accuracy", "max_miou", "amp"]
    assert list(obj) == top
    assert isinstance(obj["config"], checkpoints._Inert) and obj["epoch"] == 29
    assert type(obj["model"]) is collections.OrderedDict and obj["model"]._metadata[""] == {"version": 1}
    assert obj["model"]._metadata["img_projector.linear_hidden.1"] == {"version": 2}  # BatchNorm
    groups = obj["optimizer"]["param_groups"]
    n_buffers = sum(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in obj["model"])
    assert n_buffers == 6 and len(groups[1]["params"]) > len(groups[0]["params"])  # biases and norms: no decay
    assert sorted(groups[0]["params"] + groups[1]["params"]) == list(range(len(obj["model"]) - n_buffers))
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.05, 0.0)
    assert obj["metrics"] == {"max_accuracy": 0.0, "max_miou": 0.0}


def test_dino_fixture_is_what_torch_save_writes(cache):
    """Record by record the DINO fixture is ``torch.save`` of its own tensors (same pickle bytes, same data),
    plus the fixture record; its data is 64-byte aligned, so ``mmap=True`` loads it too."""
    path = fx.target_path("dino_vits16", cache)
    sd = torch.load(path, weights_only=True, mmap=True)
    ref = cache / "ref" / "dino_deitsmall16_pretrain.pth"
    ref.parent.mkdir(exist_ok=True)
    torch.save(sd, ref)
    with zipfile.ZipFile(path) as a, zipfile.ZipFile(ref) as b:
        ours = [n for n in a.namelist() if not n.endswith(("serialization_id", fx.FIXTURE_RECORD))]
        theirs = [n for n in b.namelist() if not n.endswith("serialization_id")]
        assert ours == theirs
        for n in ours:
            assert a.read(n) == b.read(n), n
        record = json.loads(a.read("dino_deitsmall16_pretrain/" + fx.FIXTURE_RECORD))
        assert record == {"kind": "fixture", "name": "dino_vits16", "seed": 0, "format": fx.FORMAT, "note": fx.NOTE}
        for i in a.infolist():  # every record's data starts on a 64-byte boundary, as torch.save writes them
            a.fp.seek(i.header_offset + 26)
            n_name, n_extra = struct.unpack("<HH", a.fp.read(4))
            assert (i.header_offset + 30 + n_name + n_extra) % 64 == 0, i.filename
    ref.unlink()


def test_same_seed_same_bytes(cache, tmp_path):
    names = ["dino_vits16", "group_vit_gcc_redcap_30e"]
    again = fx.write_official_weights(tmp_path / "again", names=names)
    other = fx.write_official_weights(tmp_path / "seed1", names=names[:1], seed=1)
    for name in names:
        assert checkpoints.sha256(again[name]) == checkpoints.sha256(fx.target_path(name, cache))
    assert checkpoints.sha256(other["dino_vits16"]) != checkpoints.sha256(again["dino_vits16"])
    assert checkpoints.fixture_marker(other["dino_vits16"])["seed"] == 1
    a = torch.load(again["dino_vits16"], weights_only=True)["blocks.3.attn.qkv.weight"]
    b = torch.load(other["dino_vits16"], weights_only=True)["blocks.3.attn.qkv.weight"]
    assert abs(a.std().item() - 0.0192) < 0.0005 and not torch.equal(a, b)  # N(0, 1) clipped at 2, x 0.02


def test_cached_fixture_is_reused_stale_rewritten_and_a_release_never_overwritten(cache, tmp_path):
    dst = copy_release(cache, tmp_path, "dino_vits16")
    before = dst.stat().st_mtime_ns
    fx.write_official_weights(tmp_path, names=["dino_vits16"])
    assert dst.stat().st_mtime_ns == before  # marker, pin and hash agree: kept
    fx.write_official_weights(tmp_path, names=["dino_vits16"], seed=2)  # another seed: rewritten
    assert checkpoints.fixture_marker(dst)["seed"] == 2 and dst.stat().st_mtime_ns != before
    real = fx.target_path("dino_vits8", tmp_path)
    real.write_bytes(b"the downloaded release")
    with pytest.raises(checkpoints.CheckpointError, match="not a fixture.*Refusing to overwrite"):
        fx.write_official_weights(tmp_path, names=["dino_vits8"])
    assert real.read_bytes() == b"the downloaded release"
    with pytest.raises(ValueError, match="unknown release names"):
        fx.write_official_weights(tmp_path, names=["dino_vits4"])


def test_altered_or_unpinned_fixture_is_refused(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    dst = copy_release(cache, tmp_path, "dino_vits8")
    assert backbones.load("dino_vits8").nbs_info["fixture"]
    data = bytearray(dst.read_bytes())
    data[-5000] ^= 0xFF  # inside the last tensor: same size, other bytes
    dst.write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointError, match=r"fixture.*sha256 .*differs.*changed after it was written"):
        backbones.load("dino_vits8")
    dst = copy_release(cache, tmp_path, "dino_vits8")
    checkpoints.sidecar(dst).unlink()
    with pytest.raises(checkpoints.CheckpointError, match=r"SHA-256 pin .* is missing"):
        backbones.load("dino_vits8")
    # without its source.json the file is still a fixture (the record is inside it): refused, never the release
    dst = copy_release(cache, tmp_path, "dino_vits8")
    checkpoints.source_sidecar(dst).unlink()
    assert checkpoints.fixture_marker(dst)["kind"] == "fixture"
    with pytest.raises(checkpoints.CheckpointError, match="source.json saying kind 'fixture'.*missing"):
        backbones.load("dino_vits8")
    gdst = copy_release(cache, tmp_path, "group_vit_gcc_yfcc_30e")
    with open(gdst, "r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 16)
    with pytest.raises(checkpoints.CheckpointError, match="sha256"):
        gv.load("group_vit_gcc_yfcc_30e")


def test_unmarked_file_keeps_the_release_checks(cache, tmp_path, monkeypatch):
    """Without the fixture record a file is checked as the release: size (dino_vits8) and hash; a forged
    source.json cannot turn a file without the record into an accepted fixture."""
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    sd = torch.load(fx.target_path("dino_vits8", cache), weights_only=True)
    dst = backbones.expected_path("dino_vits8")
    dst.parent.mkdir(parents=True)
    torch.save(sd, dst)  # same tensors, no fixture record
    checkpoints.sidecar(dst).write_text(checkpoints.sha256(dst) + "\n")
    assert checkpoints.fixture_marker(dst) is None
    with pytest.raises(checkpoints.CheckpointError, match="must have 86728949"):
        backbones.load("dino_vits8")
    checkpoints.source_sidecar(dst).write_text(
        '{"kind": "fixture", "name": "dino_vits8", "seed": 0, "sha256": "%s"}' % checkpoints.sha256(dst)
    )
    with pytest.raises(checkpoints.CheckpointError, match="its fixture record is missing"):
        backbones.load("dino_vits8")


def test_fixture_loaded_by_path_is_labelled(cache):
    model = backbones.load(fx.target_path("dino_vits16", cache))
    assert model.nbs_info["fixture"] and "(random weights, fixture)" in model.nbs_info["description"]
    g = gv.load(fx.target_path("group_vit_gcc_redcap_30e", cache))
    assert g.nbs_info["fixture"] and g.nbs_info["description"].endswith("(random weights, fixture)")


def test_download_clears_sidecars_of_a_deleted_file(tmp_path, monkeypatch):
    """A release downloaded where a fixture was deleted is checked as a release, not against stale sidecars."""
    dst = tmp_path / "w.pth"
    checkpoints.sidecar(dst).write_text("0" * 64 + "\n")
    checkpoints.source_sidecar(dst).write_text('{"kind": "fixture", "sha256": "%s"}' % ("0" * 64))
    monkeypatch.delenv("NBSUPPORT_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, d, progress=True: open(d, "wb").write(b"abc"))
    checkpoints.fetch_release("https://example.org/w.pth", dst, what="w", loader="test")
    assert not checkpoints.source_sidecar(dst).exists()
    assert checkpoints.sidecar(dst).read_text().strip() == hashlib.sha256(b"abc").hexdigest()


def test_downloaded_file_with_a_fixture_record_is_refused(cache, tmp_path, monkeypatch):
    """Only write_official_weights makes a fixture acceptable (its sidecars); a download that happens to hold
    the record (a mirror serving a fixture) has none and is refused, never loaded as the release."""
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    monkeypatch.delenv("NBSUPPORT_OFFLINE", raising=False)
    served = fx.target_path("dino_vits16", cache)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, d, progress=True: shutil.copy(served, d))
    with pytest.raises(checkpoints.CheckpointError, match="random-weights fixture standing in for https://dl.fbai"):
        backbones.load("dino_vits16")
