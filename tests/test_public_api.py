"""The curated top-level API: every name resolves, dir() lists them, importing the package stays light."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nbsupport as nbs


def test_every_public_name_resolves_to_a_callable():
    assert nbs.__all__ == sorted(nbs.__all__) and len(nbs.__all__) >= 12
    for name in nbs.__all__:
        assert callable(getattr(nbs, name)), name
    assert set(nbs.__all__) <= set(dir(nbs))
    with pytest.raises(AttributeError, match="no_such_call"):
        nbs.no_such_call  # noqa: B018


def test_importing_the_package_imports_no_heavy_library():
    code = "import sys, nbsupport; print(sorted(m for m in ('torch', 'matplotlib', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_quickstart_on_a_random_backbone():
    model = nbs.load_backbone("random_tiny8")
    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    x = nbs.image_to_tensor(img, 64)[None]
    keys = nbs.extract_features(model, x, "key", layer=-1)
    assert keys.shape == (1, 8, 8, 96)
    masks = nbs.maskcut_patches(keys, n_masks=2, tau="median")
    assert masks.shape == (1, 2, 8, 8) and masks.dtype == torch.bool and masks[0, 0].any()
    px = nbs.maskcut_images(model, [Image.fromarray(img)], size=64, n_masks=2, tau="median")
    assert px[0].shape == (2, 40, 56)


def test_no_public_name_shadows_a_room():
    """A top-level name equal to a subpackage (e.g. ``maskcut``) would make ``from nbsupport import maskcut``
    return the function or the package depending on what was imported first."""
    rooms = {p.name for p in Path(nbs.__file__).parent.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms >= {"core", "data", "models", "analysis", "maskcut", "training", "notebook"}
    assert not rooms & set(nbs.__all__)
