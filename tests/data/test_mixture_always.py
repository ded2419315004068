"""One packed dataset is a mixture of one part: open_mixture always returns a PackedMixture, which
reads as the dataset itself (ids, labels, manifest, metadata, order, errors), and every loader is
built from one LoaderSpec."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fasttrain.config import DataConfig
from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import generate_phantoms
from fasttrain.data import build_loader, open_packed
from fasttrain.data.base import LoaderSpec
from fasttrain.data.mixture import PackedMixture, open_mixture
from fasttrain.data.sampler import EpochSampler
from fasttrain.format.packed import PackedError, PackedSplit


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    generate_phantoms(root / "src", 40, seed=4, size=16, workers=1, progress=False)
    return convert_nih(root / "src", root / "packed", formats=("raw",), size=16, val_fraction=0.2,
                       workers=1, progress=False)


def test_one_dataset_opens_as_a_mixture_of_one_part_that_reads_as_the_dataset(packed):
    ps = open_packed(packed, "train")
    assert isinstance(ps, PackedSplit)  # the public open_packed is unchanged
    mix = open_mixture(str(packed), "train", None)
    assert isinstance(mix, PackedMixture) and len(mix.parts) == 1 and mix.offsets.tolist() == [0, ps.count]
    assert mix.ids == ps.ids and np.array_equal(mix.labels, ps.labels) and mix.label_names == ps.label_names
    assert mix.manifest == ps.manifest and mix.format == "raw" and mix.split == "train" and mix.root == ps.root
    assert mix.metadata.keys() == ps.metadata.keys()
    assert all(list(mix.metadata[c]) == list(ps.metadata[c]) for c in ("patient", "sex", "view"))
    assert np.array_equal(mix.image(3), ps.image(3))


def test_one_dataset_errors_are_its_own(packed):
    with pytest.raises(PackedError, match="no split 'nope'"):
        open_mixture(str(packed), "nope", None)


def test_one_dataset_keeps_the_plain_epoch_order(packed):
    cfg = DataConfig(path=str(packed), batch_size=4, loader="raw")
    ld = build_loader(cfg, "train", True, img_size=16, in_chans=1, seed=5, drop_last=False)
    assert isinstance(ld.packed, PackedMixture)
    plain = EpochSampler(len(ld.packed), 4, shuffle=True, seed=5)
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        plain.set_epoch(epoch)
        assert [b.tolist() for _, b in ld.sampler.batches()] == [b.tolist() for _, b in plain.batches()]
    assert ld.data_parts()[0]["path"] == str(packed) and ld.data_parts()[0]["weight"] is None
    assert ld.describe().startswith("raw memmap ") and "mixture" not in ld.describe()


@pytest.mark.parametrize("kind", ["raw", "reference"])
def test_every_loader_is_built_from_one_spec(packed, kind):
    cfg = DataConfig(path=str(packed), batch_size=4, loader=kind, reference_images=None)
    ld = build_loader(cfg, "val", False, img_size=16, in_chans=1, seed=3, batch_size=2, drop_last=True)
    assert ld.spec == LoaderSpec(train=False, img_size=16, in_chans=1, batch_size=2, rank=0, world_size=1,
                                 device=torch.device("cpu"), dtype=torch.float32, seed=3, drop_last=True, cfg=cfg)
    for f in dataclasses.fields(LoaderSpec):
        assert getattr(ld, f.name) == getattr(ld.spec, f.name), f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        ld.spec.seed = 4
