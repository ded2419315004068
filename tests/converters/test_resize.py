"""`convert --resize {crop,squash,pad}`: how a non-square frame (CheXpert, MIMIC: portrait) is fitted
to the packed square, recorded in the manifest and repeated by `predict`; a square frame (NIH) is
the same under every mode."""
from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.config import build_config
from fasttrain.converters.chexpert import convert_chexpert
from fasttrain.converters.common import ConvertError, PackOptions
from fasttrain.converters.decode import RESIZE_MODES, decode_file, to_uint8_resized
from fasttrain.converters.dicom import convert_dicom, convert_mimic_jpg
from fasttrain.converters.images import convert_images
from fasttrain.converters.nih import convert_nih
from fasttrain.converters.synthetic import generate_phantoms
from fasttrain.format.packed import open_packed, read_manifest
from fasttrain.train.builders import build_classifier
from fasttrain.train.checkpoint import save_atomic
from fasttrain.serve.predict import Predictor, predict_files
from fasttrain.workflows.reproduce import parser
from fasttrain.workflows.reproduce_plan import packed_resize_note

H, W, SIZE = 78, 64, 32  # a portrait frame (CheXpert-small is ~390 x 320)


def disk(h: int = H, w: int = W, r: int = 24) -> np.ndarray:
    """White disk of radius r centred on a black [h, w] frame."""
    yy, xx = np.mgrid[:h, :w]
    return np.where((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= r * r, 255, 0).astype(np.uint8)


def extent(img: np.ndarray) -> tuple[int, int]:
    """(height, width) of the pixels brighter than half grey."""
    ys, xs = np.nonzero(img > 127)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_square_frame_is_the_same_under_every_mode(dtype):
    img = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(dtype)
    scale = None if dtype == np.uint8 else 255.0
    outs = [to_uint8_resized(img, SIZE, full_scale=scale, resize=m) for m in RESIZE_MODES]
    assert all(np.array_equal(o, outs[0]) for o in outs)


def test_crop_keeps_the_aspect_pad_keeps_the_frame_squash_distorts():
    img = disk()
    crop = to_uint8_resized(img, SIZE, resize="crop")
    top = (H - W) // 2
    assert np.array_equal(crop, to_uint8_resized(img[top:top + W], SIZE))  # the centre square, resized
    h, w = extent(crop)
    assert abs(h - w) <= 1  # the disk stays round
    h, w = extent(to_uint8_resized(img, SIZE, resize="squash"))
    assert h / w < 0.87  # squashed by W / H = 0.82
    pad = to_uint8_resized(np.full((H, W), 200, np.uint8), SIZE, resize="pad")
    w_in = round(W * SIZE / H)  # longer side (height) to SIZE: 26 columns of frame, centred
    left = (SIZE - w_in) // 2
    assert (pad[:, left:left + w_in] == 200).all() and (pad[:, :left] == 0).all() and (pad[:, left + w_in:] == 0).all()
    h, w = extent(to_uint8_resized(img, SIZE, resize="pad"))
    assert abs(h - w) <= 1


def test_bad_mode_is_an_error():
    with pytest.raises(ValueError, match="resize must be one of"):
        to_uint8_resized(disk(), SIZE, resize="stretch")
    with pytest.raises(ConvertError, match="--resize must be one of crop, squash, pad, got 'stretch'"):
        PackOptions(resize="stretch").check()


def test_crop_is_the_default_for_portrait_sources_and_reproduce():
    for fn in (convert_chexpert, convert_mimic_jpg, convert_dicom):
        assert inspect.signature(fn).parameters["resize"].default == "crop", fn.__name__
    assert inspect.signature(convert_nih).parameters["resize"].default == "squash"  # square frames
    assert parser().parse_args(["--nih", "x", "--chexpert", "y", "--out", "z"]).resize == "crop"


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
    """Portrait PNGs (a disk each) + labels.csv, packed with --resize crop."""
    root = tmp_path_factory.mktemp("resize")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for k in range(8):
        img = disk(r=12 + k)
        img[rng.integers(0, H, 40), rng.integers(0, W, 40)] = 128  # texture: the images differ
        Image.fromarray(img, "L").save(src / f"img{k}.png")
        rows.append([f"img{k}.png", str(k % 2), f"p{k}"])
    with open(src / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "Effusion", "patient"], *rows])
    packed = convert_images(src, src / "labels.csv", root / "crop", path_col="path", label_cols=["Effusion"],
                            patient_col="patient", test_fraction=0.5, size=SIZE, workers=1, progress=False,
                            resize="crop")
    return src, packed, root


def test_manifest_records_the_mode_and_the_packed_pixels_follow_it(portrait):
    src, packed, root = portrait
    assert read_manifest(packed)["resize"] == "crop"
    ps = open_packed(packed, "test", "raw")
    files = (packed / "splits" / "test.files.txt").read_text().splitlines()
    for i, rel in enumerate(files):
        assert np.array_equal(ps.image(i), decode_file(str(src / rel), SIZE, "crop"))
    squash = convert_images(src, src / "labels.csv", root / "squash", path_col="path", label_cols=["Effusion"],
                            patient_col="patient", test_fraction=0.5, size=SIZE, workers=1, progress=False)
    assert read_manifest(squash)["resize"] == "squash"  # `convert images` keeps squash by default


def test_predict_fits_new_files_as_the_manifest_says(portrait, tmp_path, tiny_yaml):
    """A classifier fine-tuned on crop-packed data: predict crops new files the same way, so its
    scores on the source files equal the model's on the packed images."""
    src, packed, _ = portrait
    (tmp_path / "t.yaml").write_text(tiny_yaml("vit", data={"val_split": None}))
    cfg = build_config(tmp_path / "t.yaml", [f"--data.path={packed}", "--model.num_classes=1"])
    torch.manual_seed(0)
    model = build_classifier(cfg).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)  # scores that differ between images
    # no "resize" in the checkpoint: predict reads the packed data's manifest
    save_atomic({"kind": "finetune", "model": model.state_dict(), "config": cfg.to_dict(),
                 "label_names": ["Effusion"], "image_size": [SIZE, SIZE]}, tmp_path / "ft.pt")
    ps = open_packed(packed, "test", "raw")
    files = (packed / "splits" / "test.files.txt").read_text().splitlines()
    res = predict_files(tmp_path / "ft.pt", [(f, str(src / f)) for f in files], tmp_path / "pred.csv",
                        workers=1, progress=False, device="cpu")
    want = Predictor(model, cfg, SIZE, torch.device("cpu"))(np.stack([ps.image(i) for i in range(len(files))]))
    assert want.std() > 1e-3
    np.testing.assert_allclose(res["probs"], want, atol=1e-6)
    info = json.loads(Path(str(tmp_path / "pred.csv") + ".json").read_text())
    assert "resize=crop" in info["decode"]


def test_reproduce_notes_a_packed_set_fitted_otherwise(tmp_path):
    """`reproduce --chexpert PACKED` reuses a packed set as is: its plan says when that set was fitted
    otherwise than --resize asks."""
    src = generate_phantoms(tmp_path / "src", 24, seed=1, size=32, layout="chexpert", progress=False)
    squashed = convert_chexpert(src, tmp_path / "squash", size=32, resize="squash", workers=1, progress=False)
    cropped = convert_chexpert(src, tmp_path / "crop", size=32, workers=1, progress=False)
    assert "packed earlier with --resize squash, not crop" in packed_resize_note("chexpert", squashed, "crop")
    assert packed_resize_note("chexpert", cropped, "crop") is None
