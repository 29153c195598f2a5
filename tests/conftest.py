"""Fixtures shared by several test files."""

import numpy as np
import pytest
import torch


@pytest.fixture
def no_network(monkeypatch):
    """Any weight download fails the test (``torch.hub.download_url_to_file`` is the one download path)."""

    def must_not_download(url, dst, progress=True):
        raise AssertionError(f"download attempted: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", must_not_download)


@pytest.fixture
def grid_with_square():
    """Features ``[8, 8, 4]``: one direction on a planted 3 x 4 square, another everywhere else; and the
    square's mask ``[8, 8]`` (the affinity tests' hand-checkable grid)."""
    f = torch.zeros(8, 8, 4)
    f[..., 1] = 1.0
    f[2:5, 3:7] = torch.tensor([1.0, 0, 0, 0])
    m = np.zeros((8, 8), bool)
    m[2:5, 3:7] = True
    return f, m
