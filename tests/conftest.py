"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def no_network(monkeypatch):
    """Any weight download fails the test (``torch.hub.download_url_to_file`` is the one download path)."""

    def must_not_download(url, dst, progress=True):
        raise AssertionError(f"download attempted: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", must_not_download)
