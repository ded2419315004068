"""The DICOM / MIMIC-CXR converter on sources in the published layouts: the DICOM pixel pipeline
against the DICOM formulas, MIMIC's own CSVs (plain and gzipped), JPEG 2000, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fasttrain.converters.common import ConvertError
from fasttrain.converters.dicom import convert_dicom
from fasttrain.data import open_packed


def dc(src, out, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("size", 16)
    return convert_dicom(src, src / "labels.csv", out, **kw)


@pytest.mark.parametrize("id_column", ["dicom_id", "path"])
def test_dicom_pixels_labels_splits(tmp_path, id_column, write_dicom, block_mean):
    w = write_dicom(tmp_path / "mimic", id_column=id_column)
    out = dc(tmp_path / "mimic", tmp_path / "out", formats=("raw", "ffcv"))
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["splits"]) == ["train", "val", "test"]
    train, test, val = open_packed(out, "train"), open_packed(out, "test"), open_packed(out, "val")
    assert len(train) == 2 and len(test) == 1 and len(val) == 1
    # paper policy: Edema -1 -> 1 (U-Ones), Cardiomegaly -1 -> 0, Atelectasis -1 -> 1
    np.testing.assert_array_equal(train.labels, [[1, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(test.labels, [[1, 0, 1, 0, 0]])
    for ps in (train, test, val):
        ffcv = open_packed(out, ps.split, "ffcv")
        for i, ident in enumerate(ps.ids):
            ref = block_mean(w.pixels[ident], 16)  # DICOM formulas, computed by the fixture
            assert np.abs(ps.image(i).astype(float) - ref).max() <= 1.0, ident
            np.testing.assert_array_equal(ffcv.image(i), ps.image(i))
    # the MONOCHROME1 file matched its reference only because it was inverted
    m1 = test.image(0).astype(float)
    assert np.abs(m1 - (255 - block_mean(w.pixels[test.ids[0]], 16))).max() > 50


def test_dicom_bad_input(tmp_path, write_dicom):
    import pydicom
    w = write_dicom(tmp_path / "mimic")
    # a compressed syntax without an installed decoder: the error names the file and the plugin
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless
    assert not get_decoder(JPEGLSLossless).is_available  # the premise of this check
    path = w.files["d0000002-12bit-window"]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    from pydicom.encaps import encapsulate
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 64])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ConvertError, match=r"labels.csv row 3 \(d0000002-12bit-window\): .*d0000002-12bit-window.dcm: "
                                           r"DicomPluginError: pixel data compressed as JPEG-LS Lossless.*cannot be decoded; "
                                           r"install a decoder plugin, e.g. `pip install pylibjpeg pylibjpeg-libjpeg`"):
        dc(tmp_path / "mimic", tmp_path / "out")
    # --on-error skip lists it
    out = dc(tmp_path / "mimic", tmp_path / "out", on_error="skip")
    m = json.loads((out / "manifest.json").read_text())
    assert [s["id"] for s in m["skipped"]] == ["d0000002-12bit-window"]
    assert open_packed(out, "train").ids == ["d0000001-8bit-m2"]
    # not a DICOM at all
    w.files["d0000001-8bit-m2"].write_bytes(b"garbage" * 30)
    with pytest.raises(ConvertError, match=r"row 2 \(d0000001-8bit-m2\): .*not a readable DICOM file"):
        dc(tmp_path / "mimic", tmp_path / "out2")
    # unknown dicom_id, bad split value
    csv = tmp_path / "mimic" / "labels.csv"
    csv.write_text(csv.read_text().replace("d0000004-12bit-plain", "d9999999").replace(",validate,", ",holdout,"))
    with pytest.raises(ConvertError, match=r"labels.csv row 5: dicom_id 'd9999999' matches no .dcm file"):
        dc(tmp_path / "mimic", tmp_path / "out3")
    csv.write_text(csv.read_text().replace("d9999999", "d0000004-12bit-plain"))
    with pytest.raises(ConvertError, match=r"labels.csv row 5: split 'holdout'"):
        dc(tmp_path / "mimic", tmp_path / "out3")
    # the wrong CSV (NIH's, say): not "use --labels all", which would fail the same way
    other = tmp_path / "Data_Entry_2017_v2020.csv"
    other.write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n")
    with pytest.raises(ConvertError, match=r"Data_Entry_2017_v2020.csv: none of the CheXpert label columns .*; "
                                           r"is this the labels CSV\? \(found \['Image Index'"):
        convert_dicom(tmp_path / "mimic", other, tmp_path / "out4", workers=0, progress=False)


def test_dicom_voi_lut_sequence_and_sigmoid_window():
    """The VOI LUT Sequence is preferred to the window; SIGMOID windows follow PS3.3 C.11.2.1.3."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from fasttrain.converters.decode import pixels_to_unit

    def ds_with(stored):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = stored.astype("<u2").tobytes()
        return ds

    stored = np.arange(0, 4096, 64, dtype=np.uint16).reshape(8, 8)
    ds = ds_with(stored)
    ds.WindowCenter, ds.WindowWidth = 100, 50  # ignored: the LUT wins
    item = Dataset()
    first, n = 1000, 2048
    item.LUTDescriptor = [n, first, 10]
    lut = (np.linspace(0, 1, n) ** 2 * 1023).astype(np.uint16)
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = pydicom.Sequence([item])
    got = pixels_to_unit(ds)
    ref = lut[np.clip(stored.astype(int) - first, 0, n - 1)] / 1023.0
    np.testing.assert_allclose(got, ref, atol=1e-6)

    ds = ds_with(stored)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2000, 1000, "SIGMOID"
    np.testing.assert_allclose(pixels_to_unit(ds), 1 / (1 + np.exp(-4 * (stored - 2000.0) / 1000)), atol=1e-6)


def test_mimic_published_csvs(tmp_path, write_mimic, open_mimic_splits, block_mean):
    w = write_mimic(tmp_path / "mimic")
    root = tmp_path / "mimic"
    out = convert_dicom(root, root / "mimic-cxr-2.0.0-chexpert.csv", tmp_path / "out", size=16, workers=0,
                        progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["source_sha256"]) == {"mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv",
                                       "mimic-cxr-2.0.0-split.csv"}
    train, val, test = open_mimic_splits(out)
    # per-study labels, paper policy: Atelectasis -1 -> 1, Cardiomegaly -1 -> 0
    np.testing.assert_array_equal(train.labels, [[1, 0, 0, 1, 0]])
    np.testing.assert_array_equal(val.labels, [[0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(test.labels, [[0, 0, 0, 0, 1]])
    assert np.abs(test.image(0).astype(float) - block_mean(w.pixels[test.ids[0]], 16)).max() <= 1.0
    # all views: the lateral joins train
    out2 = convert_dicom(root, root / "mimic-cxr-2.0.0-chexpert.csv", tmp_path / "out2", size=16, workers=0,
                         progress=False, views="all")
    assert len(open_packed(out2, "train")) == 2
    # a study without labels is named
    csvp = root / "mimic-cxr-2.0.0-chexpert.csv"
    csvp.write_text("\n".join(ln for ln in csvp.read_text().splitlines() if "57375967" not in ln) + "\n")
    with pytest.raises(ConvertError, match=r"mimic-cxr-2.0.0-metadata.csv row 5: study s57375967 of subject "
                                           r"10000764 has no row in mimic-cxr-2.0.0-chexpert.csv"):
        convert_dicom(root, csvp, tmp_path / "out3", size=16, workers=0, progress=False)


def test_mimic_gzipped_csvs_as_physionet_publishes_them(tmp_path, write_mimic):
    import gzip
    import shutil
    root = tmp_path / "mimic"
    write_mimic(root)
    out = convert_dicom(root, root / "mimic-cxr-2.0.0-chexpert.csv", tmp_path / "plain", size=16, workers=0,
                        progress=False)
    for name in ("chexpert", "metadata", "split"):
        p = root / f"mimic-cxr-2.0.0-{name}.csv"
        with open(p, "rb") as f, gzip.open(p.with_name(p.name + ".gz"), "wb") as g:
            shutil.copyfileobj(f, g)
        p.unlink()
    out_gz = convert_dicom(root, root / "mimic-cxr-2.0.0-chexpert.csv.gz", tmp_path / "gz", size=16, workers=0,
                           progress=False)  # metadata / split .csv.gz found beside it
    m = json.loads((out_gz / "manifest.json").read_text())
    assert set(m["source_sha256"]) == {"mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz",
                                       "mimic-cxr-2.0.0-split.csv.gz"}
    for split in ("train", "val", "test"):
        a, b = open_packed(out, split), open_packed(out_gz, split)
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images, b.images)


def test_dicom_jpeg2000_decodes_or_names_the_plugin(tmp_path, monkeypatch, write_dicom, block_mean):
    """MIMIC-CXR's large files are JPEG 2000 (1.2.840.10008.1.2.4.90): decoded through whichever
    pydicom plugin is installed (here Pillow's openjpeg); with none, the error names the row, the
    file, the syntax and the pip line."""
    import io
    import pydicom
    from PIL import Image, features
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless
    if not get_decoder(JPEG2000Lossless).is_available or not features.check_codec("jpg_2000"):
        pytest.skip("no JPEG 2000 codec to build the fixture with")
    w = write_dicom(tmp_path / "mimic")
    ident = "d0000004-12bit-plain"  # 12-bit MONOCHROME2, no window: min..max
    path = w.files[ident]
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)  # lossless codestream
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    out = dc(tmp_path / "mimic", tmp_path / "out")
    val = open_packed(out, "val")
    assert val.ids == [ident]
    assert np.abs(val.image(0).astype(float) - block_mean(w.pixels[ident], 16)).max() <= 1.0
    # no plugin at all (what a Pillow built without openjpeg and no pylibjpeg looks like)
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(ConvertError, match=r"labels.csv row 5 \(d0000004-12bit-plain\): .*d0000004-12bit-plain.dcm: "
                                           r"DicomPluginError: pixel data compressed as JPEG 2000 .*\(1.2.840.10008.1.2.4.90\) "
                                           r"cannot be decoded; install a decoder plugin, e.g. "
                                           r"`pip install pylibjpeg pylibjpeg-openjpeg`"):
        dc(tmp_path / "mimic", tmp_path / "out2")


def test_dicom_without_preamble_is_read(tmp_path):
    """Files with no 128-byte preamble / 'DICM' (older archives, and what a plain pydicom
    `save_as` writes) are read, with or without a file meta group; garbage still fails."""
    import pydicom
    from fasttrain.converters.decode import read_dicom_unit
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    stored = (np.arange(32 * 24).reshape(32, 24) * 5 % 4096).astype(np.uint16)
    for meta in (True, False):
        ds = pydicom.Dataset()
        if meta:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = stored.tobytes()
        path = tmp_path / f"bare_{meta}.dcm"
        ds.save_as(path, implicit_vr=not meta, little_endian=True)
        assert path.read_bytes()[128:132] != b"DICM"
        ref = 1.0 - (stored - stored.min()) / (stored.max() - stored.min())  # MONOCHROME1, min..max
        np.testing.assert_allclose(read_dicom_unit(str(path)), ref, atol=1e-6)
    (tmp_path / "junk.dcm").write_bytes(b"garbage" * 30)
    with pytest.raises(ValueError, match=r"not a readable DICOM file: no 'DICM' header, and no Rows / PixelData"):
        read_dicom_unit(str(tmp_path / "junk.dcm"))
