"""Fixtures of the model tests."""
from __future__ import annotations

import pytest

from fasttrain.models import create_model


def _tiny_model(name: str = "mae_vit_tiny_patch16", **kw):
    """A registry model at test size: 32 px, 8-px patches, depth 2, one channel (MAE: 1 decoder block)."""
    args = dict(img_size=32, patch_size=8, depth=2, in_chans=1)
    if name.startswith("mae_"):
        args["decoder_depth"] = 1
    args.update(kw)
    return create_model(name, **args)


@pytest.fixture(scope="session")
def tiny_model():
    return _tiny_model
