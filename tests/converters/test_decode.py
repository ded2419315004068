"""The fast decode paths against their plain references: JPEG at the smallest DCT scale
vs full decode + resize on real-size images, 8/16-bit grey PNG through imagecodecs vs PIL, the
DICOM per-value LUT vs per-pixel arithmetic, the reduced DICOM paths (uncompressed box means, JPEG
2000 at reduced resolution) vs mapping every pixel; truncated files still fail; MIMIC-CXR-JPG end
to end."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fasttrain.converters import decode as D
from fasttrain.converters.common import ConvertError
from fasttrain.data import open_packed


def radiograph_like(h: int, w: int, seed: int, noise: float = 3.0) -> np.ndarray:
    """uint8 [h, w]: a phantom's anatomy upsampled to (h, w) plus quantum-mottle-like noise, so a
    q95 JPEG of 2320x2828 weighs ~2 MB like CheXpert's full-size files."""
    import cv2
    from fasttrain.converters.synthetic import draw_phantom
    base = cv2.resize(draw_phantom(seed, 0, 256).image.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(base + rng.standard_normal((h, w), dtype=np.float32) * noise), 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, quality: int = 95, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("h,w,noise", [(2828, 2320, 3.0), (3056, 2544, 1.5), (1024, 1024, 3.0)])
def test_dct_scaled_jpeg_within_one_grey_level_of_full_decode(tmp_path, h, w, noise):
    """CheXpert-full, MIMIC-CXR-JPG and 1024-px sizes: the DCT-scaled decode + INTER_AREA stays
    within 1 grey level mean |diff| of PIL full decode + the same resize (the manifest's bound)."""
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes(radiograph_like(h, w, seed=h)))
    n = D.jpeg_scale(h, w, 256)
    assert n == (1 if min(h, w) >= 8 * 256 else 2)  # 1/8 for the big ones (290x354), 1/4 for 1024 px
    scaled = D.decode_jpeg_scaled(path.read_bytes(), 256)
    assert scaled.shape == (-(-h * n // 8), -(-w * n // 8))
    fast = D.decode_raster(str(path), 256)
    ref = D.decode_raster_pil(str(path), 256)
    assert fast.shape == ref.shape == (256, 256) and fast.dtype == np.uint8
    mad = np.abs(fast.astype(float) - ref).mean()
    assert mad <= 1.0, mad
    assert "1 grey level" in D.JPEG_SCALED_NOTE


def test_small_and_colour_jpegs(tmp_path):
    """Sources smaller than twice the output decode at full size (bit-identical to PIL for grey);
    a colour JPEG goes to its luma, within rounding of PIL's 'L'; CMYK goes through PIL."""
    g = radiograph_like(300, 260, seed=1)
    p = tmp_path / "small.jpg"
    p.write_bytes(jpeg_bytes(g))
    assert D.jpeg_scale(300, 260, 256) == 8
    np.testing.assert_array_equal(D.decode_raster(str(p), 256), D.decode_raster_pil(str(p), 256))
    rgb = np.dstack([g, np.roll(g, 3, 0), 255 - g])
    p = tmp_path / "colour.jpg"
    p.write_bytes(jpeg_bytes(rgb, mode="RGB"))
    assert np.abs(D.decode_raster(str(p), 128).astype(float) - D.decode_raster_pil(str(p), 128)).mean() <= 1.0
    p = tmp_path / "cmyk.jpg"
    p.write_bytes(jpeg_bytes(rgb, mode="CMYK"))
    assert D.decode_jpeg_scaled(p.read_bytes(), 128) is None  # left to PIL
    np.testing.assert_array_equal(D.decode_raster(str(p), 128), D.decode_raster_pil(str(p), 128))


@pytest.mark.parametrize("kind", ["jpeg", "png8", "png16"])
def test_truncated_files_fail_never_grey(tmp_path, kind):
    """A truncated JPEG / PNG is an error on the fast paths (libjpeg and libpng would fill grey
    rows; simplejpeg strict=True and imagecodecs raise), also when only the last bytes are cut."""
    g = radiograph_like(700, 600, seed=2)
    p = tmp_path / "full"
    if kind == "jpeg":
        p.write_bytes(jpeg_bytes(g))
    elif kind == "png8":
        Image.fromarray(g).save(p, "PNG")
    else:
        import cv2
        assert cv2.imwrite(str(p) + ".png", g.astype(np.uint16) * 257)
        p = tmp_path / "full.png"
    data = p.read_bytes()
    for cut in (len(data) // 2, len(data) - 20):
        t = tmp_path / f"cut{cut}"
        t.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"corrupt or truncated|truncated|broken"):
            D.decode_raster(str(t), 64)


def test_png_fast_path_bit_identical_to_pil(tmp_path):
    """8-bit and 16-bit grey (with and without sBIT) through imagecodecs equal the PIL path byte
    for byte; RGBA and palette PNGs are left to PIL."""
    pytest.importorskip("imagecodecs")
    import cv2
    g = radiograph_like(1024, 1024, seed=3)
    cases = {}
    cases["g8.png"] = lambda p: Image.fromarray(g).save(p)
    g16 = (g.astype(np.uint16) * 257 + np.random.default_rng(0).integers(0, 200, g.shape)).astype(np.uint16)
    cases["g16.png"] = lambda p: cv2.imwrite(str(p), g16)
    g12 = (g.astype(np.uint16) * 16)
    cases["g12sbit.png"] = lambda p: _png_with_sbit(p, g12, 12)
    for name, write in cases.items():
        p = tmp_path / name
        write(p)
        assert D.decode_png_fast(p.read_bytes(), 256) is not None, name  # the fast path ran
        np.testing.assert_array_equal(D.decode_raster(str(p), 256), D.decode_raster_pil(str(p), 256), err_msg=name)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)]), "RGBA").save(rgba)
    assert D.decode_png_fast(rgba.read_bytes(), 64) is None
    np.testing.assert_array_equal(D.decode_raster(str(rgba), 64), D.decode_raster_pil(str(rgba), 64))


def _png_with_sbit(path, img16: np.ndarray, bits: int) -> None:
    """A 16-bit grey PNG with an sBIT chunk inserted after IHDR (cv2 / PIL do not write one)."""
    import struct
    import zlib
    import cv2
    ok, buf = cv2.imencode(".png", img16)
    assert ok
    data = buf.tobytes()
    chunk = b"sBIT" + bytes([bits])
    sbit = struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data[:33] + sbit + data[33:])
    assert D.png_significant_bits(str(path)) == bits


@pytest.mark.parametrize("photometric,window,rescale", [
    ("MONOCHROME2", None, None), ("MONOCHROME1", (2048, 3000), None), ("MONOCHROME2", (1800, 2500), (0.5, -100)),
])
def test_dicom_lut_path_bit_identical(tmp_path, photometric, window, rescale, write_dicom_file):
    """The per-value LUT gives the per-pixel result exactly (windowed, min..max, rescaled) on a
    real-size 12-bit frame; a signed frame too."""
    import pydicom
    g = radiograph_like(1500, 1250, seed=4).astype(np.float32)
    stored = np.clip(g * 16 + np.random.default_rng(1).normal(0, 8, g.shape), 0, 4095).astype(np.uint16)
    kw = {}
    if window:
        kw.update(center=window[0], width=window[1])
    if rescale:
        kw.update(slope=rescale[0], intercept=rescale[1])
    path = tmp_path / "x.dcm"
    write_dicom_file(path, stored, bits_stored=12, photometric=photometric, **kw)
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    fast = D.pixels_to_unit_lut(ds, arr)
    assert fast is not None
    np.testing.assert_array_equal(fast, D.pixels_to_unit(ds, arr))
    signed = arr.astype(np.int16) - 2048
    np.testing.assert_array_equal(D.pixels_to_unit_lut(ds, signed), D.pixels_to_unit(ds, signed))
    ds.ModalityLUTSequence = []  # a form the LUT path leaves to the plain one
    assert D.pixels_to_unit_lut(ds, arr) is None


def _mimic_like_stored(seed: int, noise: float = 8.0) -> np.ndarray:
    """uint16 [3056, 2544]: a MIMIC-CXR-sized 12-bit frame (radiograph-like anatomy + mottle)."""
    g = radiograph_like(3056, 2544, seed=seed).astype(np.float32)
    return np.clip(g * 16 + np.random.default_rng(seed).normal(0, noise, g.shape), 0, 4095).astype(np.uint16)


@pytest.mark.parametrize("photometric,window,rescale,function,noise", [
    ("MONOCHROME2", (2048, 3686), None, None, 8),  # MIMIC's window: clips both ends
    ("MONOCHROME1", (1800, 2500), (0.5, -100), "LINEAR_EXACT", 8),
    ("MONOCHROME2", None, None, None, 8),  # no VOI: min..max
    # a narrower window over noisy pixels: many 4x4 blocks mix clipped and in-window values, where
    # averaging before the mapping is wrong unless the values are clamped first (measured: 0.38
    # mean |diff| with the clamp, 0.62 without; 1.6 vs 7.2 at noise 700)
    ("MONOCHROME2", (2048, 2200), None, None, 120),
])
def test_dicom_reduced_path_within_bound(tmp_path, photometric, window, rescale, function, noise, write_dicom_file):
    """Uncompressed real-size DICOM: clamp + 4x4 integer means before the mapping stays within
    0.5 grey level mean |diff| (the manifest's bound) of mapping every pixel first, max 3."""
    import pydicom
    kw = dict(voi_function=function)
    if window:
        kw.update(center=window[0], width=window[1])
    if rescale:
        kw.update(slope=rescale[0], intercept=rescale[1])
    path = tmp_path / "x.dcm"
    write_dicom_file(path, _mimic_like_stored(5, noise), bits_stored=12, photometric=photometric, **kw)
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    assert D.dicom_reduction(*arr.shape, 256) == 4
    exact = D.to_uint8_resized(D.pixels_to_unit(ds, arr), 256, full_scale=1.0)
    fast = D.decode_dicom_reduced(ds, arr.copy(), 256)
    assert fast is not None and fast.shape == (256, 256) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(int) - exact)
    assert diff.mean() <= 0.5 and diff.max() <= 3, (diff.mean(), diff.max())
    np.testing.assert_array_equal(D.decode_dicom(str(path), 256), fast)  # the converter's path is this one
    assert "0.5 grey level" in D.DICOM_REDUCED_NOTE


def test_dicom_reduced_path_signed_values(tmp_path, write_dicom_file):
    """Signed stored values (PixelRepresentation 1) take the reduced path too (cv2's int16 area
    reduction, the table indexed from the minimum), within the same bound."""
    import pydicom
    path = tmp_path / "s.dcm"
    write_dicom_file(path, _mimic_like_stored(3), bits_stored=12, photometric="MONOCHROME2", center=0, width=3000)
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.int16) - 2048
    ds.PixelRepresentation = 1
    exact = D.to_uint8_resized(D.pixels_to_unit(ds, arr), 256, full_scale=1.0)
    fast = D.decode_dicom_reduced(ds, arr.copy(), 256)
    assert fast is not None and np.abs(fast.astype(int) - exact).mean() <= 0.5


def test_dicom_reduced_path_declines_what_it_would_change(tmp_path, write_dicom_file):
    """SIGMOID windows (not piecewise linear), windows so narrow that a stored value is > 1/8 grey
    level, and images under 4x the output size map every pixel first: decode_dicom is then the
    plain path bit for bit."""
    import pydicom
    stored = _mimic_like_stored(6)[:1536, :1280]
    for name, kw, size in [("sigmoid", dict(center=2048, width=3000, voi_function="SIGMOID"), 256),
                           ("narrow", dict(center=2048, width=200), 256),
                           ("small", dict(center=2048, width=3000), 400)]:
        path = tmp_path / f"{name}.dcm"
        write_dicom_file(path, stored, bits_stored=12, photometric="MONOCHROME2", **kw)
        ds = pydicom.dcmread(path)
        assert D.decode_dicom_reduced(ds, ds.pixel_array.copy(), size) is None, name
        np.testing.assert_array_equal(D.decode_dicom(str(path), size),
                                      D.to_uint8_resized(D.pixels_to_unit(ds), size, full_scale=1.0))


def test_dicom_jpeg2000_reduced_resolution_within_bound(tmp_path, monkeypatch):
    """A real-size 12-bit lossless JPEG 2000 DICOM (MIMIC-CXR's form) decodes at 1/4 resolution
    (the wavelet's coarser levels only) within 1 grey level mean |diff| of the full decode; a
    codestream with fewer levels at what it holds; a corrupt codestream is an error naming the
    file; with no pydicom plugin the full path's error (naming the pip line) still comes."""
    import pydicom
    from PIL import features
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless
    from fasttrain.bench.convert import _write_dicom, j2k_codestream
    if not get_decoder(JPEG2000Lossless).is_available or not features.check_codec("jpg_2000"):
        pytest.skip("no JPEG 2000 codec")
    stored = _mimic_like_stored(7)
    path = tmp_path / "j2k.dcm"
    _write_dicom(path, stored, 12, j2k=True)  # 12-bit codestream, window 2048 / 3686, as MIMIC's files
    ds, arr, k = D.dicom_stored(str(path), 256)
    assert k == 4 and arr.shape == (764, 636)
    full = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(full, stored)  # lossless
    exact = D.to_uint8_resized(D.pixels_to_unit(ds, full), 256, full_scale=1.0)
    got = D.decode_dicom(str(path), 256)
    diff = np.abs(got.astype(int) - exact)
    assert diff.mean() <= 1.0, diff.mean()
    assert "1 grey level" in D.DICOM_J2K_NOTE
    # a codestream cut in half inside a well-formed file
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    bad = pydicom.dcmread(path)
    bad.PixelData = encapsulate([frame[: len(frame) // 2]])
    bad.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    with pytest.raises(D.DicomPluginError, match=r"cut.dcm: pixel data compressed as JPEG 2000 .* cannot be decoded"):
        D.decode_dicom(str(tmp_path / "cut.dcm"), 256)  # openjpeg refused it: pydicom's full decode names it
    # fewer wavelet levels than the reduction wants: decoded at what the codestream holds (openjpeg
    # refuses a deeper `reduce`); and a 16-bit-precision codestream of the same 12-bit values
    for name, code, levels, shape in [
            ("levels1", j2k_codestream(stored, 12, levels=1), 1, (1528, 1272)),
            ("levels0", j2k_codestream(stored, 12, levels=0), 0, (3056, 2544)),
            ("prec16", j2k_codestream(stored, 16), 5, (764, 636))]:
        assert D.j2k_header(code)[:2] == (levels, 16 if name == "prec16" else 12)
        other = pydicom.dcmread(path)
        other.PixelData = encapsulate([code])
        other.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        _, arr, k = D.dicom_stored(str(tmp_path / f"{name}.dcm"), 256)
        assert arr.shape == shape and 0 <= int(arr.min()) and int(arr.max()) < 4096 + 64, name  # stored values
        diff = np.abs(D.decode_dicom(str(tmp_path / f"{name}.dcm"), 256).astype(int) - exact)
        assert diff.mean() <= 1.0, (name, diff.mean())
    assert D.j2k_header(b"not a codestream") is None
    # no VOI window: min..max of the whole image, which the low-pass band does not keep: full decode
    nowin = pydicom.dcmread(path)
    del nowin.WindowCenter, nowin.WindowWidth
    nowin.save_as(tmp_path / "nowin.dcm", enforce_file_format=True)
    assert D.dicom_stored(str(tmp_path / "nowin.dcm"), 256)[2] == 1
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(D.DicomPluginError, match=r"pip install pylibjpeg pylibjpeg-openjpeg"):
        D.decode_dicom(str(path), 256)


def test_mimic_jpg_end_to_end(tmp_path, write_mimic, open_mimic_splits, block_mean):
    """MIMIC-CXR-JPG as published (.jpg tree, gzipped CSVs): same joins, views and splits as MIMIC
    DICOM; the negbio labeler by --labels-csv; the CLI sub-command; a missing file is named."""
    from fasttrain.converters.cli import main
    from fasttrain.converters.dicom import convert_mimic_jpg
    root = tmp_path / "mimic-cxr-jpg"
    w = write_mimic(root, jpg=True)
    out = convert_mimic_jpg(root, tmp_path / "out", size=16, workers=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "mimic-cxr-jpg"
    assert set(m["source_sha256"]) == {"mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz",
                                       "mimic-cxr-2.0.0-split.csv.gz"}
    assert "1 grey level" in m["preprocessing"]["jpeg"]
    train, val, test = open_mimic_splits(out)
    # COMPETITION order: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion; paper policy
    np.testing.assert_array_equal(train.labels, [[1, 0, 0, 1, 0]])
    np.testing.assert_array_equal(test.labels, [[0, 0, 0, 0, 1]])
    for split in (train, val, test):
        for i, did in enumerate(split.ids):
            np.testing.assert_array_equal(split.image(i), D.decode_raster(str(w.files[did]), 16))
            assert np.abs(split.image(i).astype(float) - block_mean(w.pixels[did], 16)).mean() <= 1.0  # 0.41-0.46 measured
    # the other labeler (Edema positive everywhere in the fixture), through the CLI
    rc = main(["mimic-jpg", "--src", str(root), "--out", str(tmp_path / "negbio"), "--size", "16", "--workers", "0",
               "--labels-csv", str(root / "mimic-cxr-2.0.0-negbio.csv.gz"), "--views", "all", "--no-progress"])
    assert rc == 0
    nb = open_packed(tmp_path / "negbio", "train")
    assert len(nb) == 2 and np.all(nb.labels[:, 3] == 1)
    # a missing image names the metadata row and the file
    w.files[test.ids[0]].unlink()
    with pytest.raises(ConvertError, match=r"mimic-cxr-2.0.0-metadata.csv.gz row 5: JPEG file .*68b5c4b1.*\.jpg not found"):
        convert_mimic_jpg(root, tmp_path / "out3", size=16, workers=0, progress=False)
    with pytest.raises(ConvertError, match=r"no mimic-cxr-2.0.0-chexpert.csv\[.gz\]"):
        convert_mimic_jpg(tmp_path / "out", tmp_path / "out4", size=16, workers=0, progress=False)


def _cv2_work(i: int) -> float:
    import cv2
    x = np.random.default_rng(i).standard_normal((1500, 1500), dtype=np.float32)
    return float(cv2.GaussianBlur(cv2.resize(x, (2000, 2000), interpolation=cv2.INTER_CUBIC), (0, 0), 1.5).mean())


@pytest.mark.timeout(180)
def test_pool_after_cv2_threads_ran_in_parent_does_not_hang():
    """cv2's thread pool does not survive fork: after a large cv2 op in this process, forked
    workers hung on their first parallel cv2 call (the bench test did, after the tests above).
    bounded_imap runs the pool with one cv2 thread here and restores the setting after."""
    import cv2
    from fasttrain.converters.common import bounded_imap
    cv2.resize(np.zeros((3000, 3000), np.float32), (2500, 2500), interpolation=cv2.INTER_CUBIC)  # pool up
    before = cv2.getNumThreads()
    assert len(list(bounded_imap(_cv2_work, range(4), 2))) == 4
    assert cv2.getNumThreads() == before
