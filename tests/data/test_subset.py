"""data.views and data.label_fraction: the subset a loader reads, the same on every call for a
seed, patient-disjoint (whole patients), every label's positives kept or a named error, in the
provenance; across raw / reference loaders and mixtures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttrain.config import DataConfig
from fasttrain.data import build_loader
from fasttrain.data.base import LoaderError
from fasttrain.format.packed import open_packed
from fasttrain.data.sampler import EpochSampler
from fasttrain.data.subset import fraction_subset


@pytest.fixture(scope="module")
def packed(tmp_path_factory, packed_phantoms):
    return packed_phantoms(tmp_path_factory.mktemp("subset"), 300, seed=2, size=16)


def _positions(cfg, split="train", train=True, seed=0, **kw):
    ld = build_loader(cfg, split, train, img_size=16, in_chans=1, seed=seed, **kw)
    ld.set_epoch(0)
    return ld, np.sort(np.concatenate([i for _, i in ld.sampler.batches()]))


def test_views_filter_reads_only_those_views(packed):
    ps = open_packed(packed, "train")
    cfg = DataConfig(path=str(packed), batch_size=4, loader="raw", views="PA")
    ld, pos = _positions(cfg, train=False)
    assert pos.tolist() == np.flatnonzero(ps.metadata["view"] == "PA").tolist()
    # the batches carry those images' labels
    labels = torch.cat([y for _, y in ld]).numpy()
    assert np.array_equal(labels, ps.labels[ps.metadata["view"] == "PA"])
    with pytest.raises(LoaderError, match=r"data.views=\['LL'\]: no image of split 'train'"):
        _positions(DataConfig(path=str(packed), batch_size=4, loader="raw", views=["LL"]))


def test_label_fraction_is_patient_disjoint_deterministic_and_in_provenance(packed):
    ps = open_packed(packed, "train")
    patients = ps.metadata["patient"]
    cfg = DataConfig(path=str(packed), batch_size=4, loader="raw", label_fraction=0.5)
    ld, pos = _positions(cfg, drop_last=False, seed=7)
    ld2, pos2 = _positions(cfg, drop_last=False, seed=7)
    assert np.array_equal(pos, pos2) and ld.packed.subset_info["ids"] == [ps.ids[i] for i in pos]
    assert 0.5 * ps.count <= len(pos) < 0.5 * ps.count + 5  # whole patients: at most one over
    inside = set(patients[pos])
    outside = set(patients[np.setdiff1d(np.arange(ps.count), pos)])
    assert not inside & outside  # no patient split between the subset and the rest
    _, other = _positions(cfg, drop_last=False, seed=8)
    assert not np.array_equal(pos, other)  # another seed, another subset
    # the same subset as the plain rule: patients in a seeded permutation of their sorted ids
    uniq = np.unique(patients.astype(str))
    order = np.random.Generator(np.random.PCG64(7)).permutation(len(uniq))
    taken, n = [], 0
    for k in order:
        if n >= np.ceil(0.5 * ps.count):
            break
        taken.append(uniq[k])
        n += int((patients == uniq[k]).sum())
    assert pos.tolist() == np.flatnonzero(np.isin(patients.astype(str), taken)).tolist()
    parts = ld.data_parts()
    assert parts[0]["subset"]["label_fraction"] == 0.5 and parts[0]["subset"]["count"] == len(pos)
    # the validation loader reads its whole split
    _, val = _positions(cfg, split="val", train=False)
    assert len(val) == open_packed(packed, "val").count


def test_too_small_a_fraction_names_the_label():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, 0]], np.float32)
    patients = np.array(["a", "b", "c", "d"], dtype=object)
    with pytest.raises(LoaderError, match=r"no positive for label\(s\) \['(x|y)'"):
        for seed in range(20):  # some seed keeps one patient without one of the labels
            fraction_subset(patients, labels, ["x", "y"], 0.25, seed, np.arange(4))
    assert fraction_subset(patients, labels, ["x", "y"], 1.0, 0, np.arange(4)).tolist() == [0, 1, 2, 3]
    with pytest.raises(LoaderError, match=r"label_fraction must be in \(0, 1\]"):
        fraction_subset(patients, labels, ["x", "y"], 0.0, 0, np.arange(4))


def test_mixture_subset_maps_through_every_part(packed, tmp_path):
    ps = open_packed(packed, "train")
    n = ps.count
    cfg = DataConfig(path=f"{packed},{packed}", batch_size=4, loader="raw", views="AP")
    _, pos = _positions(cfg, train=False)
    ap = np.flatnonzero(ps.metadata["view"] == "AP")
    assert pos.tolist() == ap.tolist() + (ap + n).tolist()
    w = DataConfig(path=f"{packed},{packed}", batch_size=4, loader="raw", views="AP", weights=[1, 1],
                   samples_per_epoch=40)
    _, drawn = _positions(w, drop_last=False)
    assert len(drawn) == 40 and set(drawn % n) <= set(ap)


def test_sampler_subset_maps_the_same_order():
    s = EpochSampler(5, 2, shuffle=True, seed=3, subset=np.array([10, 20, 30, 40, 50]))
    plain = EpochSampler(5, 2, shuffle=True, seed=3)
    assert (s.order() == np.array([10, 20, 30, 40, 50])[plain.order()]).all()


def test_pretraining_reads_every_image_whatever_the_fraction(packed):
    cfg = DataConfig(path=str(packed), batch_size=4, loader="raw", label_fraction=0.5)
    _, pos = _positions(cfg, drop_last=False, need_labels=False)
    assert len(pos) == open_packed(packed, "train").count


# DALI before FFCV: importing DALI for the first time after an FFCV loader has run in the process
# failed 1 in ~10 runs inside DALI's import-time ast.literal_eval ("SystemError: AST constructor
# recursion depth mismatch", CPython 3.11); the full suite imports DALI much earlier.
@pytest.mark.parametrize("kind,module,view", [("dali", "nvidia.dali", "AP"), ("ffcv", "ffcv", "PA")])
def test_dali_and_ffcv_loaders_read_the_subset(tmp_path, kind, module, view):
    pytest.importorskip(module)
    from fasttrain.converters.nih import convert_nih
    from fasttrain.converters.synthetic import generate_phantoms
    generate_phantoms(tmp_path / "src", 80, seed=1, size=16, workers=1, progress=False)
    out = convert_nih(tmp_path / "src", tmp_path / "p", formats=("raw", kind), size=16, workers=1, progress=False)
    ps = open_packed(out, "train")
    want = np.flatnonzero(ps.metadata["view"] == view)
    for train in (False, True):
        cfg = DataConfig(path=str(out), batch_size=4, loader=kind, views=view, num_workers=1)
        ld = build_loader(cfg, "train", train, img_size=16, in_chans=1, drop_last=False)
        ld.set_epoch(0)
        seen = np.sort(np.concatenate([np.asarray(i) for _, _, i in ld.iter_with_index()]))
        assert seen.tolist() == want.tolist()
        assert ld.data_parts()[0]["subset"]["views"] == [view]


def test_subset_loaders_count_only_the_subset_and_zero_is_an_error(packed):
    """A loader's dataset_size is what it reads (validation checks every image is scored once
    against it); label_fraction 0 is refused, not read as 'all'; the fraction applies to the
    training split's unaugmented reads too (the probe's features), never to other splits."""
    ps = open_packed(packed, "train")
    views = DataConfig(path=str(packed), batch_size=4, loader="raw", views="PA")
    ld = build_loader(views, "train", False, img_size=16, in_chans=1)
    assert ld.dataset_size == int((ps.metadata["view"] == "PA").sum()) == sum(len(y) for _, y in ld)
    frac = DataConfig(path=str(packed), batch_size=4, loader="raw", label_fraction=0.5)
    ld = build_loader(frac, "train", False, img_size=16, in_chans=1, seed=7)
    _, pos = _positions(frac, drop_last=False, seed=7)
    assert ld.dataset_size == len(pos) < ps.count  # unaugmented reads of train: the same subset
    assert build_loader(frac, "test", False, img_size=16, in_chans=1, seed=7).dataset_size == \
        open_packed(packed, "test").count
    with pytest.raises(LoaderError, match=r"label_fraction must be in \(0, 1\], got 0.0"):
        build_loader(DataConfig(path=str(packed), batch_size=4, loader="raw", label_fraction=0),
                     "train", True, img_size=16, in_chans=1)


def test_weighted_mixture_epoch_defaults_to_the_subset(packed):
    """Without data.samples_per_epoch a weighted mixture's epoch draws as many images as the subset
    holds (not the whole mixture's count: 1% of the labels must not mean 100 passes over them)."""
    w = DataConfig(path=f"{packed},{packed}", batch_size=4, loader="raw", views="AP", weights=[1, 1])
    _, drawn = _positions(w, drop_last=False)
    n_ap = int((open_packed(packed, "train").metadata["view"] == "AP").sum())
    assert len(drawn) == 2 * n_ap
