"""Synthetic phantoms (determinism, NIH layout, signs, prevalences) and the DALI shards read by a
real DALI CPU pipeline."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fasttrain.converters.nih import NIH_LABELS, convert_nih
from fasttrain.converters.synthetic import PREVALENCE, draw_phantom, generate_phantoms
from fasttrain.data import open_packed


def test_phantoms_deterministic_and_in_nih_layout(tmp_path):
    a = generate_phantoms(tmp_path / "a", 40, seed=7, size=64, progress=False)
    b = generate_phantoms(tmp_path / "b", 40, seed=7, size=64, progress=False, workers=2)
    c = generate_phantoms(tmp_path / "c", 40, seed=8, size=64, progress=False)
    names = sorted(p.name for p in (a / "images").iterdir())
    assert len(names) == 40
    for f in ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    for n in names:
        assert (a / "images" / n).read_bytes() == (b / "images" / n).read_bytes()
    assert (a / "images" / names[0]).read_bytes() != (c / "images" / names[0]).read_bytes()
    assert "SYNTHETIC" in (a / "README.txt").read_text()
    # the NIH CSV header exactly as published (11 fields when split on commas)
    header = (a / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0]
    assert len(header.split(",")) == 11 and header.startswith("Image Index,Finding Labels,Follow-up #,Patient ID")
    # patient-wise split: no patient in both lists, every image in exactly one
    tv = (a / "train_val_list.txt").read_text().split()
    te = (a / "test_list.txt").read_text().split()
    assert sorted(tv + te) == names and tv and te
    assert not ({x.split("_")[0] for x in tv} & {x.split("_")[0] for x in te})


def test_phantom_signs_are_visible():
    """Each finding changes the image where its sign is drawn: the same draw with the finding
    forced off (same seed) differs by a clear margin at 64 px."""
    import fasttrain.converters.synthetic as syn
    base_prev = dict(syn.PREVALENCE)
    try:
        for name in NIH_LABELS:
            syn.PREVALENCE.update({k: 0.0 for k in NIH_LABELS})
            off = draw_phantom(3, 11, 64).image.astype(float)
            syn.PREVALENCE[name] = 1.0
            ph = draw_phantom(3, 11, 64)
            assert ph.labels[NIH_LABELS.index(name)] == 1 and ph.labels.sum() == 1
            diff = np.abs(ph.image.astype(float) - off)
            # at least ~10 pixels (of 4096) change by >= 20 grey levels
            assert (diff >= 20).sum() >= 10, (name, (diff >= 20).sum())
    finally:
        syn.PREVALENCE.clear()
        syn.PREVALENCE.update(base_prev)


def test_phantom_prevalences():
    y = np.stack([draw_phantom(0, i, 32).labels for i in range(1500)])
    for j, name in enumerate(NIH_LABELS):
        p = PREVALENCE[name]
        assert p >= 0.05
        assert abs(y[:, j].mean() - p) < 4 * np.sqrt(p * (1 - p) / len(y)) + 1e-3, name
    assert (y.sum(1) >= 2).mean() > 0.2  # several findings per image is common


def test_phantoms_through_nih_converter_and_dali_pipeline(tmp_path):
    src = generate_phantoms(tmp_path / "src", 48, seed=1, size=128, progress=False)
    out = convert_nih(src, tmp_path / "out", formats=("raw", "dali"), size=64, workers=0, progress=False,
                      shard_size=10)
    m = json.loads((out / "manifest.json").read_text())
    assert m["synthetic"] is True and "SYNTHETIC" in m["note"] and m["dataset"].endswith("-synthetic")
    raw, dali = open_packed(out, "train", "raw"), open_packed(out, "train", "dali")
    assert raw.synthetic and "SYNTHETIC" in repr(raw)
    # labels match the CSV's Finding Labels
    with open(src / "Data_Entry_2017_v2020.csv") as f:
        rows = {r[0]: r[1] for r in csv.reader(f)}
    for ident, y in zip(raw.ids, raw.labels):
        found = [NIH_LABELS[j] for j in np.flatnonzero(y)]
        assert rows[ident] == ("|".join(found) if found else "No Finding")
    # JPEG tolerance on radiograph-like content: mean |diff| < 2 grey levels at q95
    diffs = [np.abs(dali.image(i).astype(float) - raw.image(i)).mean() for i in range(len(raw))]
    assert max(diffs) < 2.0

    # a real DALI CPU pipeline reads the shards; two shards of the reader cover the split once
    dali_mod = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    def run(shard_id, num_shards):
        """Samples of one reader shard, first epoch only (DALI's shard i of N holds positions
        [i*E//N, (i+1)*E//N); stick_to_shard + padding keep the epoch inside it)."""
        @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1)
        def pipe():
            jpg, lbl, idx = fn.readers.webdataset(
                paths=dali.shards, index_paths=dali.index_files, ext=["jpg", "lbl", "idx"],
                dtypes=[types.UINT8, types.FLOAT, types.INT64], random_shuffle=False,
                shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=True,
                name="reader")
            img = fn.decoders.image(jpg, device="cpu", output_type=types.GRAY)
            return img, lbl, idx
        p = pipe()
        p.build()
        e = p.reader_meta("reader")["epoch_size"]
        n = (shard_id + 1) * e // num_shards - shard_id * e // num_shards
        seen = []
        while len(seen) < n:
            imgs, lbls, idxs = p.run()
            for k in range(len(imgs)):
                seen.append((int(np.array(idxs[k]).reshape(-1)[0]), np.array(imgs[k]), np.array(lbls[k])))
        return {i: (img, lbl) for i, img, lbl in seen[:n]}

    assert dali_mod is not None
    s0, s1 = run(0, 2), run(1, 2)
    assert not (set(s0) & set(s1)) and sorted(set(s0) | set(s1)) == list(range(len(raw)))
    for i, (img, lbl) in {**s0, **s1}.items():
        assert img.shape == (64, 64, 1) and img.dtype == np.uint8
        np.testing.assert_array_equal(lbl, raw.labels[i])
        assert np.abs(img[:, :, 0].astype(float) - raw.image(i)).mean() < 2.0


def test_cli_synthetic_then_nih(tmp_path, capsys):
    from fasttrain.cli import main
    assert main(["convert", "synthetic", "--out", str(tmp_path / "src"), "--n", "12", "--seed", "4", "--size", "32",
                 "--no-progress"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert main(["convert", "nih", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "32",
                 "--workers", "0", "--no-progress"]) == 0
    assert "(SYNTHETIC)" in capsys.readouterr().out
    assert open_packed(tmp_path / "out", "test").synthetic
    # the source folder must not exist either
    assert main(["convert", "synthetic", "--out", str(tmp_path / "src"), "--n", "12", "--no-progress"]) == 1


def test_phantoms_in_chexpert_layout_packed_by_the_chexpert_converter(tmp_path):
    """`--layout chexpert` writes the CheXpert-v1.0-small release exactly (CSV header, Path prefix,
    patientNNNNN/studyN/viewN_{frontal,lateral}.jpg, patient-disjoint valid.csv with 0/1 only), and
    the real CheXpert converter packs it unchanged, marked SYNTHETIC."""
    from fasttrain.converters.chexpert import CHEXPERT_ALL, convert_chexpert
    from fasttrain.converters.cli import main as convert_main
    assert convert_main(["synthetic", "--layout", "chexpert", "--out", str(tmp_path / "cx"), "--n", "60",
                         "--seed", "3", "--size", "48", "--no-progress"]) == 0
    root = tmp_path / "cx" / "CheXpert-v1.0-small"
    assert "SYNTHETIC" in (root / "README.txt").read_text()
    rows = {}
    for name in ("train.csv", "valid.csv"):
        with open(root / name, newline="") as f:
            r = list(csv.reader(f))
        assert r[0] == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_ALL]
        rows[name] = r[1:]
    every = rows["train.csv"] + rows["valid.csv"]
    assert len(every) == 60
    import re
    for row in every:
        assert re.fullmatch(r"CheXpert-v1\.0-small/(train|valid)/patient\d{5}/study\d+/view\d+_(frontal|lateral)\.jpg",
                            row[0]), row[0]
        assert (tmp_path / "cx" / row[0]).is_file()
        assert row[3] == ("Frontal" if row[0].endswith("_frontal.jpg") else "Lateral")
        assert set(row[5:]) <= {"1.0", "0.0", "-1.0", ""}
    assert all(row[0].split("/")[1] == "train" for row in rows["train.csv"])
    assert all(row[0].split("/")[1] == "valid" for row in rows["valid.csv"])
    assert all(set(row[5:]) <= {"1.0", "0.0"} for row in rows["valid.csv"])  # radiologist labels
    pat = lambda rs: {row[0].split("/")[2] for row in rs}  # noqa: E731
    assert pat(rows["train.csv"]) and pat(rows["valid.csv"]) and not pat(rows["train.csv"]) & pat(rows["valid.csv"])
    assert any(row[3] == "Lateral" for row in every)
    # the same (seed, n, size) writes the same bytes
    b = generate_phantoms(tmp_path / "cx2", 60, seed=3, size=48, layout="chexpert", progress=False)
    assert (b / "CheXpert-v1.0-small" / "train.csv").read_bytes() == (root / "train.csv").read_bytes()
    # packed by the real converter, frontal views only, valid.csv -> test
    out = convert_chexpert(tmp_path / "cx", tmp_path / "packed", size=32, progress=False, workers=1)
    m = json.loads((out / "manifest.json").read_text())
    assert m["synthetic"] is True and m["dataset"] == "chexpert-synthetic"
    n_front = {s: sum(row[3] == "Frontal" for row in rows[f]) for s, f in (("train", "train.csv"), ("test", "valid.csv"))}
    assert {s: m["splits"][s]["count"] for s in ("train", "test")} == n_front
    te = open_packed(out, "test")
    assert te.image(0).shape == (32, 32) and te.labels.shape == (n_front["test"], 5)
    with pytest.raises(Exception, match="layout"):
        generate_phantoms(tmp_path / "bad", 10, layout="mimic", progress=False)


def test_chexpert_plan_always_has_a_train_and_a_valid_patient():
    """Small --n in the CheXpert layout: one patient may hold up to 6 rows, yet there is always a
    second one for valid.csv (31 of 120 plans for n = 2..7 had none before)."""
    from fasttrain.converters.synthetic import _chexpert_plan
    for n in range(2, 8):
        for seed in range(20):
            rows, valid = _chexpert_plan(n, seed, 0.2)
            patients = {r["patient"] for r in rows}
            assert len(rows) == n and valid and patients - valid, (n, seed)
