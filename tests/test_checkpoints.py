"""The one download-and-verify path for official weights (checkpoints.fetch_release): pinned and recorded
SHA-256, size check, NBSUPPORT_OFFLINE, errors that name the URL and the path to put the file at."""

import hashlib
import shutil

import pytest
import torch

from nbsupport.models import checkpoints

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 test vector
URL = "https://example.org/weights/abc.bin"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NBSUPPORT_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A fake server: download_url_to_file copies ``abc`` (3 bytes) and records every URL asked for."""
    src = tmp_path / "server.bin"
    src.write_bytes(b"abc")
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        shutil.copy(src, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return calls


def fetch(dst, **kw):
    return checkpoints.fetch_release(URL, dst, what="Weights for 'abc'", loader="test.load", **kw)


def test_sha256_is_the_standard_digest(tmp_path):
    p = tmp_path / "abc.bin"
    p.write_bytes(b"abc")
    assert checkpoints.sha256(p) == ABC_SHA256 == hashlib.sha256(b"abc").hexdigest()


def test_first_download_records_the_hash_and_later_uses_check_it(cache, served):
    dst = cache / "abc" / "abc.bin"
    assert fetch(dst) == dst and served == [URL]
    assert checkpoints.sidecar(dst).read_text().strip() == ABC_SHA256
    assert fetch(dst) == dst and served == [URL]  # from the cache: no second download
    dst.write_bytes(b"abd")  # same size, different content
    with pytest.raises(checkpoints.CheckpointError, match=r"sha256 .*differs.*ba7816bf8f01.*example\.org"):
        fetch(dst)


def test_pinned_hash_and_size_are_checked_without_a_sidecar(cache, served):
    dst = cache / "abc.bin"
    fetch(dst, size=3, sha256_hex=ABC_SHA256)
    assert not checkpoints.sidecar(dst).exists()  # pinned: nothing recorded
    with pytest.raises(checkpoints.CheckpointError, match="sha256"):
        fetch(dst, sha256_hex="0" * 64)
    with pytest.raises(checkpoints.CheckpointError, match="has 3 bytes but must have 4"):
        fetch(dst, size=4)


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_downloads_nothing_and_says_where_the_file_goes(cache, served, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    dst = cache / "abc" / "abc.bin"
    with pytest.raises(checkpoints.WeightsUnavailableError) as e:
        fetch(dst, download=how != "argument", alternatives=["'random'"])
    msg = str(e.value)
    assert served == [] and not dst.exists()
    assert f"Download\n  {URL}\nand put the file at\n  {dst}\n" in msg
    assert "NBSUPPORT_CACHE to a folder holding abc/abc.bin" in msg and "test.load" in msg and "'random'" in msg


def test_failed_download_leaves_nothing(cache, monkeypatch):
    import urllib.error

    def no_network(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    dst = cache / "abc.bin"
    with pytest.raises(checkpoints.WeightsUnavailableError, match="download failed.*Name or service"):
        fetch(dst)
    assert not dst.exists() and not checkpoints.sidecar(dst).exists()
