"""Image decoding for the converters: any source file -> uint8 grey [size, size] (RESIZE_MODES).

One place for the pixels, so every converter (and `predict`) turns a file into the same image:
grey conversion, bit depth, resize and quantisation are decided here.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, features


# How a frame is fitted to the square [size, size]: crop = shorter side to size, centre square
# (no distortion; Xiao et al.'s Resize + CenterCrop); squash = whole frame to size x size (aspect
# changed); pad = longer side to size, centred on black. A square frame is the same under each.
RESIZE_MODES = ("crop", "squash", "pad")


def to_uint8_resized(img: np.ndarray, size: int, full_scale: Optional[float] = None,
                     resize: str = "squash") -> np.ndarray:
    """Fit a 2-D grey image to [size, size] (`resize`, see RESIZE_MODES) with area interpolation
    and quantise to uint8.

    uint8 input is resized directly (cv2's INTER_AREA on uint8 rounds correctly and is 3x faster
    than going through float). Other inputs are resized in float32 first, then mapped to 0..255
    with `full_scale` (the value that becomes 255), so quantisation happens once, at the end.
    crop takes the centre square of side min(H, W) before resizing (the same pixels as resizing
    the shorter side to `size` and then centre-cropping, up to the sub-pixel offset of the crop).
    """
    import cv2
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty image {img.shape}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    h, w = img.shape
    out_h = out_w = size
    if resize == "crop" and h != w:
        m = min(h, w)
        img = img[(h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]  # [m, m] centre square
    elif resize == "pad" and h != w:
        out_h, out_w = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    interp = cv2.INTER_AREA if (img.shape[0] >= out_h and img.shape[1] >= out_w) else cv2.INTER_LINEAR
    if img.dtype == np.uint8:
        x = np.ascontiguousarray(img) if img.shape == (out_h, out_w) else \
            cv2.resize(img, (out_w, out_h), interpolation=interp)
    else:
        x = img.astype(np.float32, copy=False)  # (a float32 image is resized in place of a 31 MB copy)
        if img.shape != (out_h, out_w):
            x = cv2.resize(x, (out_w, out_h), interpolation=interp)
        scale = 255.0 / float(full_scale if full_scale is not None else 1.0)
        x = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
    if (out_h, out_w) == (size, size):
        return x
    canvas = np.zeros((size, size), np.uint8)  # pad: black around the centred frame
    top, left = (size - out_h) // 2, (size - out_w) // 2
    canvas[top:top + out_h, left:left + out_w] = x
    return canvas


def png_significant_bits(path: str) -> Optional[int]:
    """The grey sample's significant bits from a PNG file's sBIT chunk, or None."""
    with open(path, "rb") as f:
        return _sbit_from_bytes(f.read())


def decode_raster_pil(path: str, size: int, data: Optional[bytes] = None, resize: str = "squash") -> np.ndarray:
    """The plain reference for PNG / JPEG (and the path for every form the fast decoders do not
    take): PIL decodes the whole image, then the same grey conversion and resize.

    PIL, not cv2: PIL raises on truncated files where cv2 (libjpeg / libpng) returns grey rows or
    None. Colour goes to grey with ITU-R 601 luma (PIL's 'L'); alpha is dropped (NIH's RGBA PNGs
    carry the same grey in R, G and B). 16-bit images map 0..65535 to 0..255, or 0..2^b-1 when the
    PNG's sBIT chunk declares b significant bits (12-bit radiographs).
    """
    data = Path(path).read_bytes() if data is None else data  # the file's bytes (decode_raster read them)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im)
            if mode == "I" and arr.max(initial=0) > 65535:
                raise ValueError(f"32-bit integer image with values up to {arr.max()}")
            return _sixteen_bit(arr, _sbit_from_bytes(data), size, resize)
        if mode == "F":
            raise ValueError("floating-point images are not supported")
        if mode != "L":
            im = im.convert("L")
        arr = np.asarray(im)
    return to_uint8_resized(arr, size, resize=resize)


def _sixteen_bit(arr: np.ndarray, bits: Optional[int], size: int, resize: str = "squash") -> np.ndarray:
    # a 12-bit radiograph saved as 16-bit PNG declares it in sBIT; 0..65535 would make it
    # nearly black (max 16/255)
    full = float(2 ** bits - 1) if bits and 8 <= bits < 16 else 65535.0
    return to_uint8_resized(arr.astype(np.float32), size, full_scale=full, resize=resize)


# ----------------------------------------------------------------------------- fast raster paths

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"
# What the manifest records about the JPEG path (pack.py copies it into "preprocessing").
JPEG_SCALED_NOTE = ("JPEG: libjpeg-turbo DCT-domain scaling (simplejpeg) to the smallest of 1/8, 1/4, 1/2 keeping "
                    "both sides >= the output size (else full size), then the same INTER_AREA resize; mean |diff| vs full decode + "
                    "resize <= 1 grey level (tested on 2320x2828 and 3056x2544 radiograph-like q95 JPEGs)")
PNG_NOTE = ("PNG: 8/16-bit greyscale decoded by imagecodecs (libpng), bit-identical to PIL; other PNG "
            "forms (RGB, RGBA, palette, 1/2/4-bit, alpha) by PIL")


class ImageDecodeError(ValueError):
    """A corrupt or truncated PNG / JPEG file (never decoded to grey rows or a partial image)."""


# libjpeg-turbo scales by n/8 for n = 1..16; we take only the power-of-two reductions 1/8, 1/4, 1/2
# (an 8x8 block -> n x n by dropping DCT coefficients), the fast ones: n = 3, 5, 6, 7 run the
# general scaled IDCT and save little over full decode + resize. Smaller sources decode at full size.
DCT_SCALES = (1, 2, 4)


def jpeg_scale(h: int, w: int, size: int) -> int:
    """n of the n/8 scale to decode an h x w JPEG at: the smallest in DCT_SCALES keeping both sides
    (ceil(side * n / 8)) >= `size`, else 8 (full size)."""
    for n in DCT_SCALES:
        if -(-h * n // 8) >= size and -(-w * n // 8) >= size:
            return n
    return 8


def decode_jpeg_scaled(data: bytes, size: int) -> Optional[np.ndarray]:
    """JPEG bytes -> uint8 grey [h', w'] decoded at the smallest DCT scale keeping both sides >=
    `size`, or None for forms the fast path does not take (CMYK / YCCK, or a header libjpeg-turbo
    cannot parse: 12-bit, lossless; PIL then decides).

    libjpeg-turbo scales inside the inverse DCT (an 8x8 block becomes n x n pixels), skipping most
    of the IDCT, upsampling and colour work and making the resize 64/n^2 times smaller; entropy
    decoding, the floor, is unchanged. The GRAY output of a colour JPEG is its luma (Y) channel,
    what PIL's 'L' computes from RGB up to rounding. strict=True turns libjpeg's recoverable
    warnings ("Premature end of JPEG file": a truncated file it would fill with grey) into errors.
    """
    try:
        import simplejpeg
    except ImportError:
        raise ImportError("JPEG decoding needs simplejpeg (libjpeg-turbo): `pip install simplejpeg`") from None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("Gray", "YCbCr", "RGB"):
        return None
    n = jpeg_scale(h, w, size)
    try:
        # simplejpeg picks the smallest libjpeg-turbo scale with both sides >= these: exactly n/8
        img = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=-(-h * n // 8),
                                     min_width=-(-w * n // 8), strict=True)
    except ValueError as e:
        raise ImageDecodeError(f"corrupt or truncated JPEG (libjpeg-turbo: {e})") from None
    return img[:, :, 0] if img.ndim == 3 else img  # [h', w'] (simplejpeg keeps a channel axis)


def png_header(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR (always the first chunk, at byte 8)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageDecodeError("corrupt PNG: no IHDR chunk")
    return data[24], data[25]


def _sbit_from_bytes(data: bytes) -> Optional[int]:
    """The grey sample's significant bits from a PNG's sBIT chunk (before IDAT), or None.

    Hand-read because neither PIL nor cv2 exposes sBIT: 8-byte signature, then chunks of
    (length u32 BE, type, data, crc)."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos = 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"sBIT":
            return data[pos + 8] if n else None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + n
    return None


def decode_png_fast(data: bytes, size: int, resize: str = "squash") -> Optional[np.ndarray]:
    """8- or 16-bit greyscale PNG bytes -> uint8 [size, size] through imagecodecs (libpng, with
    libpng's own inflate and unfilter: 1.6x PIL on 8-bit, 2.3x on 16-bit 1024-px images here),
    or None for every other PNG form (PIL then decodes: those are rare, and PIL's colour-to-grey
    rounding is what we keep). The pixels equal PIL's exactly (lossless format; tested), so the
    packed bytes do not depend on which path ran. imagecodecs raises on a truncated stream, even
    on one cut inside the zlib checksum that PIL accepts."""
    try:
        import imagecodecs
    except ImportError:  # optional speed-up: the PIL path decodes the same pixels
        return None
    depth, colour = png_header(data)
    if colour != 0 or depth not in (8, 16):
        return None
    try:
        arr = imagecodecs.png_decode(data)
    except Exception as e:  # imagecodecs.PngError and friends
        raise ImageDecodeError(f"corrupt or truncated PNG (libpng: {e})") from None
    if arr.ndim != 2:  # a tRNS chunk expanded to grey + alpha: leave it to PIL
        return None
    if arr.dtype == np.uint8:
        return to_uint8_resized(arr, size, resize=resize)  # [size, size]
    return _sixteen_bit(arr, _sbit_from_bytes(data), size, resize)


def decode_raster(path: str, size: int, resize: str = "squash") -> np.ndarray:
    """Decode a PNG (8 / 16 bit, grey / RGB / RGBA / palette) or JPEG file to uint8 [size, size]
    (fitted by `resize`, see RESIZE_MODES).

    The format is read from the file's first bytes, not its suffix. Fast paths: JPEG decoded at
    the smallest DCT scale that keeps both sides >= size (within 1 grey level mean |diff| of full
    decode + resize), 8/16-bit grey PNG through libpng (bit-identical to PIL). Everything else, and
    the plain reference, is `decode_raster_pil`. A truncated or corrupt file raises on every path.
    """
    with open(path, "rb") as f:
        data = f.read()
    img = None
    if data.startswith(JPEG_SIGNATURE):
        img = decode_jpeg_scaled(data, size)
        if img is not None:
            return to_uint8_resized(img, size, resize=resize)
    elif data.startswith(PNG_SIGNATURE):
        img = decode_png_fast(data, size, resize)
        if img is not None:
            return img
    return decode_raster_pil(path, size, data, resize)


# ----------------------------------------------------------------------------- DICOM

class DicomPluginError(RuntimeError):
    """Compressed pixel data and no installed pydicom plugin that decodes it."""


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window to [0, 1], per DICOM PS3.3 C.11.2.1.2 (the output range is ours: 0..1)."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width {width} must be > 0")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"Window Width {width} must be >= 1 for LINEAR")
    if width == 1:
        return (x > center - 0.5).astype(np.float32)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(v) -> float:
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def pixels_to_unit(ds, arr: Optional[np.ndarray] = None) -> np.ndarray:
    """A dataset's pixels as float32 [H, W] in [0, 1], bright = dense (bone): the plain reference,
    every step applied to every pixel."""
    if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"multi-frame image ({ds.NumberOfFrames} frames); expected one radiograph")
    arr = ds.pixel_array if arr is None else arr
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:  # colour: ITU-R 601 luma, then treat as grey
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if arr.ndim != 2:
        raise ValueError(f"pixel array of shape {arr.shape}; expected [rows, columns]")
    return _values_to_unit(ds, arr)


def _values_to_unit(ds, values: np.ndarray) -> np.ndarray:
    """Stored values (any shape) -> float32 in [0, 1]: Modality LUT, VOI, MONOCHROME1 inversion.

    Elementwise except for the no-VOI case, which takes min..max over `values`."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    x = np.asarray(apply_modality_lut(values, ds), dtype=np.float32)  # rescale slope / intercept
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2])
        # the LUT is indexed by integer values (the modality output, rounded)
        x = np.asarray(apply_voi_lut(np.rint(x).astype(np.int32), ds, index=0, prefer_lut=True),
                       dtype=np.float32) / float(2 ** bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        x = _window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), str(getattr(ds, "VOILUTFunction", "LINEAR")))
    else:  # no VOI: the image's own range
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        x = 1.0 - x  # MONOCHROME1: high values are dark
    elif str(ds.PhotometricInterpretation).strip() != "MONOCHROME2":
        raise ValueError(f"PhotometricInterpretation {ds.PhotometricInterpretation!r}; expected MONOCHROME1/2")
    return x


def pixels_to_unit_lut(ds, arr: np.ndarray) -> Optional[np.ndarray]:
    """`pixels_to_unit` bit for bit, computed once per stored value instead of once per pixel, or
    None where that does not hold (colour, multi-frame, non-integer pixels, a Modality LUT
    Sequence, a value range over 2^17).

    A radiograph has ~7.5 M pixels but at most 65,536 distinct 16-bit values: the float64 modality
    and window arithmetic runs on the range arr.min()..arr.max() (the same function of each value,
    so the same float32 result), then one gather maps the image: 4.4x faster on a 3000x2500 12-bit
    frame (160 -> 36 ms). The no-VOI min..max case is the same too: with a linear rescale the extremes over the
    range are those of the image (its min and max values are in it)."""
    vl = _value_lut(ds, arr)
    return None if vl is None else _lookup(vl, arr)  # [H, W] float32


def _value_lut(ds, arr: np.ndarray) -> Optional[tuple[np.ndarray, int]]:
    """(f of every stored value lo..hi [V] float32, lo) for a single-frame grey integer image
    [H, W], or None where a per-value table does not apply (see pixels_to_unit_lut)."""
    import cv2
    if (int(getattr(ds, "NumberOfFrames", 1) or 1) != 1 or int(getattr(ds, "SamplesPerPixel", 1)) != 1
            or arr.ndim != 2 or arr.dtype.kind not in "ui" or "ModalityLUTSequence" in ds):
        return None
    if arr.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
        lo, hi = (int(v) for v in cv2.minMaxLoc(arr)[:2])  # one pass (min() and max() are two)
    else:
        lo, hi = int(arr.min()), int(arr.max())
    if hi - lo >= 1 << 17:
        return None
    return _values_to_unit(ds, np.arange(lo, hi + 1, dtype=arr.dtype)), lo  # values in the image's own dtype


def _lookup(vl: tuple[np.ndarray, int], x: np.ndarray) -> np.ndarray:
    """x (stored values within the table's range) -> f(x) float32, by one gather."""
    lut, lo = vl
    if x.dtype.kind == "u":  # index by the stored value itself: no subtraction pass over the image
        full = np.zeros(lo + len(lut), np.float32)
        full[lo:] = lut
        return full[x]
    return lut[x.astype(np.int32) - lo]


# The one-line fix per compressed syntax (pydicom's own list names every backend, including a Pillow
# that is installed but built without the codec, which reads as if nothing were missing).
_J2K = "pip install pylibjpeg pylibjpeg-openjpeg"
_LJ = "pip install pylibjpeg pylibjpeg-libjpeg"
PIP_HINTS = {
    "1.2.840.10008.1.2.4.90": _J2K, "1.2.840.10008.1.2.4.91": _J2K,  # JPEG 2000 (MIMIC-CXR's large files)
    "1.2.840.10008.1.2.4.201": _J2K, "1.2.840.10008.1.2.4.202": _J2K, "1.2.840.10008.1.2.4.203": _J2K,  # HTJ2K
    "1.2.840.10008.1.2.4.50": _LJ, "1.2.840.10008.1.2.4.51": _LJ, "1.2.840.10008.1.2.4.57": _LJ,
    "1.2.840.10008.1.2.4.70": _LJ, "1.2.840.10008.1.2.4.80": _LJ, "1.2.840.10008.1.2.4.81": _LJ,
}


def _pixel_error(path: str, ds, err: Exception) -> Exception:
    """pydicom's message on a missing plugin does not name the file; ours does, and says what to install."""
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is not None and tsuid.is_compressed:
        hint = ""
        try:
            from pydicom.pixels import get_decoder
            dec = get_decoder(tsuid)
            if not dec.is_available:
                pip = PIP_HINTS.get(str(tsuid))
                hint = (f"; install a decoder plugin, e.g. `{pip}`" if pip else "") + \
                    " (pydicom's options: " + "; ".join(dec.missing_dependencies) + ")"
        except Exception:  # an unknown syntax: pydicom has no decoder at all
            hint = "; pydicom has no decoder for it"
        if not hint:  # a decoder is installed but failed on this file: keep its own words
            hint = f" ({err})"
        return DicomPluginError(f"{path}: pixel data compressed as {tsuid.name} ({tsuid}) cannot be decoded{hint}")
    return err


def _dcmread(path: str):
    """pydicom.dcmread, also for files without the 128-byte preamble + 'DICM' (older archives, and
    what pydicom's own `save_as` writes unless told `enforce_file_format=True`): those are read
    with force=True and must then hold Rows + PixelData, and a missing Transfer Syntax is taken
    from the encoding pydicom found while parsing."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as e:
        first = e
    except Exception as e:
        raise ValueError(f"not a readable DICOM file: {e}") from e
    try:
        ds = pydicom.dcmread(path, force=True)
        ok = "PixelData" in ds and "Rows" in ds
    except Exception:
        ok = False
    if not ok:
        # (pydicom's own words end with "Use force=True", which we just did)
        raise ValueError("not a readable DICOM file: no 'DICM' header, and no Rows / PixelData when read "
                         "as a bare data set") from first
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        implicit, little = ds.original_encoding
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _dicom_pixels(path: str, ds=None):
    """(data set, stored values [H, W] from pydicom's pixel_array): a missing plugin or a broken
    pixel stream is an error naming the file and, where it helps, the pip line."""
    ds = _dcmread(path) if ds is None else ds
    if "PixelData" not in ds:
        raise ValueError("no PixelData element")
    try:
        return ds, ds.pixel_array
    except Exception as e:
        raise _pixel_error(path, ds, e) from e


J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")  # JPEG 2000 lossless / lossy
DICOM_J2K_NOTE = (
    "JPEG 2000 DICOM (single-frame, unsigned, grey, with a VOI window or LUT): decoded at reduced resolution by openjpeg (Pillow's "
    "`reduce`: the wavelet's low-pass band at 1/k, k as for the reduced path: both sides >= 2x the output size, "
    "the finer code-blocks never entropy-decoded), then the mapping and the same INTER_AREA resize; mean |diff| vs "
    "full decode <= 1 grey level (tested on 3056x2544 12-bit lossless)")


def j2k_header(codestream: bytes) -> Optional[tuple[int, int, bool]]:
    """(decomposition levels, bits per sample, signed) of a JPEG 2000 codestream's first
    component, from its main header, or None when it cannot be read.

    Decoding at 1/2^r needs r <= levels: openjpeg refuses more. The precision matters because
    Pillow returns N-bit samples scaled up to its mode's 8 or 16 bits (pydicom's own Pillow
    decoder shifts them back). Main header: SOC (FF4F), then marker segments FFxx + a 2-byte
    length, up to SOT (FF90); SIZ (FF51): Lsiz(2) Rsiz(2) 8 x 4-byte sizes Csiz(2), then per
    component Ssiz(1) = signed << 7 | (bits - 1); COD (FF52): Lcod(2) Scod(1) progression(1)
    layers(2) MCT(1) levels(1) ..."""
    start = codestream.find(b"\xff\x4f\xff\x51")  # SOC + SIZ (past a JP2 box wrapper, if any)
    if start < 0 or start + 42 > len(codestream):
        return None
    ssiz = codestream[start + 2 + 40]
    pos = start + 2
    while pos + 4 <= len(codestream):
        marker, length = codestream[pos:pos + 2], int.from_bytes(codestream[pos + 2:pos + 4], "big")
        if marker == b"\xff\x52":
            if pos + 9 >= len(codestream):
                return None
            return codestream[pos + 9], (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
        if marker == b"\xff\x90" or marker[0] != 0xFF or length < 2:  # SOT: the main header ended
            return None
        pos += 2 + length
    return None


def _j2k_reduced(path: str, ds, size: int) -> tuple[Optional[np.ndarray], int]:
    """(stored values at 1/k resolution [ceil(H/k), ceil(W/k)], k) for a JPEG 2000 frame, or
    (None, 1) where the full decode applies.

    JPEG 2000 is a wavelet pyramid: decoding at resolution level r reads and entropy-decodes only
    the code-blocks of the coarser levels. On a 3056x2544 12-bit lossless MIMIC-like frame r = 2
    (764x636) decodes in 77 ms vs 1.2 s at full size (16x); the DCT scaling of JPEG saves only the
    inverse transform. Taken only where pydicom itself would decode the frame (the plugin check
    keeps the missing-plugin error) and the codestream is what the data set says it is."""
    tsuid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if (tsuid not in J2K_SYNTAXES or int(getattr(ds, "NumberOfFrames", 1) or 1) != 1
            or int(getattr(ds, "SamplesPerPixel", 1)) != 1 or int(getattr(ds, "PixelRepresentation", 0)) != 0
            or "PixelData" not in ds):
        return None, 1
    if not (("WindowCenter" in ds and "WindowWidth" in ds) or ("VOILUTSequence" in ds and len(ds.VOILUTSequence))):
        # no VOI: the mapping stretches the image's own min..max, which the low-pass band does
        # not keep (an isolated extreme is smoothed away): full decode
        return None, 1
    k = dicom_reduction(int(ds.Rows), int(ds.Columns), size)
    if k == 1:
        return None, 1
    from pydicom.pixels import get_decoder
    if not features.check_codec("jpg_2000") or not get_decoder(tsuid).is_available:
        return None, 1
    from pydicom.encaps import generate_frames
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception:
        return None, 1  # an encapsulation pydicom's full decode will judge (and name)
    head = j2k_header(frame)
    if head is None or head[2]:
        return None, 1  # unreadable header or signed samples: pydicom's full decode decides
    levels, bits, _ = head
    r = min(k.bit_length() - 1, levels)  # resolution level: 1/2^r, at most the levels coded
    if r == 0:
        return None, 1
    try:
        with Image.open(io.BytesIO(frame)) as im:
            if im.size != (int(ds.Columns), int(ds.Rows)) or im.mode not in ("L", "I;16"):
                return None, 1  # not the frame the header describes (pydicom then decides)
            im.reduce = r
            im.load()
            arr = np.array(im)  # [ceil(H/2^r), ceil(W/2^r)] uint8 / uint16, writable
    except Exception:
        # openjpeg refused it: pydicom's full decode (any plugin) decides, and names the file if it
        # is corrupt; only such files pay a second decode
        return None, 1
    shift = (16 if arr.dtype == np.uint16 else 8) - bits
    if shift > 0:  # Pillow scaled the N-bit samples up to its mode's width: back to stored values
        np.right_shift(arr, shift, out=arr)
    return arr, 1 << r


def dicom_stored(path: str, size: int) -> tuple:
    """The decode step of a DICOM file: (data set, stored values, k) with k = 1 for pydicom's
    full-size pixel_array, k > 1 for a JPEG 2000 frame decoded at 1/k resolution. What `fasttrain
    bench convert` times as the decode-only ceiling."""
    ds = _dcmread(path)
    arr, k = _j2k_reduced(path, ds, size)
    if arr is not None:
        return ds, arr, k
    ds, arr = _dicom_pixels(path, ds)
    return ds, arr, 1


def _unit(path: str, ds, arr: np.ndarray) -> np.ndarray:
    """Every pixel mapped to [0, 1]: the per-value LUT where it applies, else the plain reference."""
    try:
        fast = pixels_to_unit_lut(ds, arr)
        return fast if fast is not None else pixels_to_unit(ds, arr)
    except Exception as e:
        raise _pixel_error(path, ds, e) from e


def read_dicom_unit(path: str) -> np.ndarray:
    """A DICOM file's pixels as float32 [H, W] in [0, 1] at full size (VOI-mapped, MONOCHROME1 inverted)."""
    ds, arr = _dicom_pixels(path)
    return _unit(path, ds, arr)


# What the manifest records about the reduced DICOM path (dicom.py copies it into "preprocessing").
DICOM_REDUCED_NOTE = (
    "DICOM with a linear mapping (rescale + LINEAR / LINEAR_EXACT window, or min..max) and >= 8 stored values per "
    "grey level: stored values clamped to the window's ends, box-averaged by the largest power of two k keeping both "
    "sides >= 2x the output size (exact-factor INTER_AREA, integer means), then the mapping and the same INTER_AREA "
    "resize; mean |diff| vs mapping every pixel first <= 0.5 grey level (tested on 3056x2544 12-bit). Other "
    "mappings (SIGMOID, VOI LUT Sequence), colour and small images map every pixel first")


def dicom_reduction(h: int, w: int, size: int) -> int:
    """k of the box pre-reduction: the largest power of two keeping both sides // k >= 2 * size.

    Twice the output size, not once (as the JPEG DCT scale): the final INTER_AREA then still
    averages >= 2 x 2 reduced pixels, and the two-stage result stays within a fraction of a grey
    level of the one-stage one (k = 8 on 3056x2544 -> 256 measured 0.5-0.7 mean, max 5 levels)."""
    k = 1
    while h // (2 * k) >= 2 * size and w // (2 * k) >= 2 * size:
        k *= 2
    return k


def decode_dicom_reduced(ds, arr: np.ndarray, size: int, resize: str = "squash") -> Optional[np.ndarray]:
    """uint8 [size, size] from stored values [H, W], box-reduced by `dicom_reduction` before the
    VOI mapping, or None where that is not (nearly) the same image (see DICOM_REDUCED_NOTE).

    Why it holds: with a linear rescale and a LINEAR window the mapping f is linear between two
    clip points and flat outside them. Clamping the stored values to the last flat value at each
    end leaves f(v) unchanged for every pixel and makes f linear on what is left (up to one stored
    value at each kink), and a linear f commutes with averaging: mean(f(v)) = f(mean(v)). So the
    7.8 Mpx of a MIMIC frame go through one in-place clamp and exact-factor area reductions
    (cv2's fast integer path, uint16), and only 1/k^2 of the pixels through the mapping and the
    float resize: ~4x less work after pydicom's decode than mapping every pixel. The integer
    means round by <= 0.5 stored value per 2x step; the path is taken only when a stored value is
    <= 1/8 grey level, so that costs < 0.1 level before the final rounding."""
    import cv2
    if arr.dtype not in (np.uint8, np.uint16, np.int16) or ("VOILUTSequence" in ds and len(ds.VOILUTSequence)):
        return None  # (the dtypes cv2's exact-factor INTER_AREA takes)
    if ("WindowCenter" in ds and "WindowWidth" in ds
            and (str(getattr(ds, "VOILUTFunction", "") or "LINEAR")).upper() not in ("LINEAR", "LINEAR_EXACT")):
        return None  # SIGMOID: not piecewise linear
    h, w = arr.shape
    k = dicom_reduction(h, w, size)
    if k == 1:
        return None
    vl = _value_lut(ds, arr)  # f of each stored value lo..hi
    if vl is None:
        return None
    lut, lo = vl
    hi = lo + len(lut) - 1
    if lut.size > 1 and 255.0 * float(np.abs(np.diff(lut)).max()) > 0.125:
        return None  # a stored value is > 1/8 grey level: the integer means' rounding would show
    moving = np.flatnonzero(lut != lut[0])
    if moving.size == 0:  # one value (or all in one clipped end): a flat image
        return to_uint8_resized(np.full((h // k, w // k), lut[0], np.float32), size, full_scale=1.0, resize=resize)
    a = lo + max(int(moving[0]) - 1, 0)  # the last value of the low flat end
    b = lo + min(int(np.flatnonzero(lut != lut[-1])[-1]) + 1, lut.size - 1)  # the first of the high one
    x = arr
    if a > lo or b < hi:  # f(clamp(v, a, b)) == f(v) for every v: clamp in place (pixel_array is ours)
        x = np.clip(arr, a, b, out=arr if arr.flags.writeable else None)
    H, W = h // k * k, w // k * k  # drops < k edge rows / columns (< 0.3% of a side), as the JPEG DCT scale pads
    x = x[:H, :W]
    while k > 1:  # 2x2 means: cv2's exact-factor INTER_AREA path (SIMD), 2x faster than one k x k pass
        x = cv2.resize(x, (x.shape[1] // 2, x.shape[0] // 2), interpolation=cv2.INTER_AREA)
        k //= 2
    u = _lookup(vl, x)  # [H/k, W/k] float32 in [0, 1]
    return to_uint8_resized(u, size, full_scale=1.0, resize=resize)


def decode_dicom(path: str, size: int, resize: str = "squash") -> np.ndarray:
    """DICOM file -> uint8 [size, size] (VOI-mapped, MONOCHROME1 inverted, area-resized): the
    reduced path where the mapping is linear, else every pixel mapped before the resize; a JPEG
    2000 frame decoded at reduced resolution."""
    ds, arr, k = dicom_stored(path, size)
    if k == 1:
        img = decode_dicom_reduced(ds, arr, size, resize)
        if img is not None:
            return img
    return to_uint8_resized(_unit(path, ds, arr), size, full_scale=1.0, resize=resize)


# ----------------------------------------------------------------------------- preload

def preload(decode=None) -> None:
    """Import the libraries `decode` uses in this process, before the pool forks its workers.

    Forked workers inherit imported modules; without this every worker of every pool imports them
    itself: cv2 + simplejpeg + imagecodecs ~0.3 s, pydicom ~0.6 s idle (2 s each on a loaded
    machine), a fixed cost per worker and per split that made a 32-image bench pack slower than
    its decode-only ceiling. Importing does not start threads (cv2 makes its pool on first use)."""
    import cv2  # noqa: F401
    import PIL.Image  # noqa: F401
    if decode in (None, decode_raster, decode_file):
        import simplejpeg  # noqa: F401
        try:
            import imagecodecs  # noqa: F401
        except ImportError:
            pass
    if decode in (None, decode_dicom, decode_file):
        import pydicom  # noqa: F401
        import pydicom.pixels  # noqa: F401


# ----------------------------------------------------------------------------- any file

DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def decode_file(path: str, size: int, resize: str = "squash") -> np.ndarray:
    """Any supported source file -> uint8 grey [size, size], chosen by suffix: DICOM (.dcm,
    .dicom, or no suffix: archives often drop it) or raster (PNG 8/16-bit, JPEG). The one decoder
    for sources whose layout we do not know (the generic converter, `fasttrain predict`)."""
    suffix = Path(path).suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return decode_raster(path, size, resize)
    if suffix in DICOM_SUFFIXES or suffix == "":
        return decode_dicom(path, size, resize)
    raise ValueError(f"unsupported file type {suffix!r}; expected one of "
                     f"{', '.join(RASTER_SUFFIXES + DICOM_SUFFIXES)} (or a DICOM file without suffix)")
