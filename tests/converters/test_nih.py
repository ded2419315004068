"""NIH converter end to end on fixtures in the real layouts: every format read back with
open_packed against a numpy reference, split files, val carving, bad input, atomicity, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fasttrain.converters.common import ConvertError
from fasttrain.converters.nih import NIH_LABELS, convert_nih
from fasttrain.data import open_packed


SIZE = 24  # fixtures are 48 px: INTER_AREA by 2 is exactly the 2x2 block mean
JPEG_MEAN_TOL = 2.0  # DALI shards (q95) vs raw: mean |diff| in grey levels (the documented tolerance)
REPO = Path(__file__).resolve().parents[2]


def convert(src, out, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return convert_nih(src, out, size=kw.pop("size", SIZE), **kw)


def check_against_reference(out: Path, written, block_mean, splits=("train", "test")):
    """raw == block-mean reference (+-1 for rounding), ffcv == raw exactly, dali ~ raw (JPEG)."""
    for split in splits:
        raw = open_packed(out, split, "raw")
        assert raw.ids == written.ids[split]
        np.testing.assert_array_equal(raw.labels, written.labels[split])
        assert raw.label_names == NIH_LABELS and raw.image_size == (SIZE, SIZE)
        files = (out / raw.manifest["splits"][split]["files"]).read_text().splitlines()
        assert [written.root / f for f in files] == [written.files[i] for i in raw.ids]
        for i, ident in enumerate(raw.ids):
            ref = block_mean(written.pixels[ident], SIZE)
            got = raw.image(i)
            assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE)
            assert np.abs(got.astype(float) - ref).max() <= 1.0, ident
        for fmt in raw.manifest["formats"]:
            ps = open_packed(out, split, fmt)
            assert ps.ids == raw.ids and len(ps) == len(raw)
            np.testing.assert_array_equal(ps.labels, raw.labels)
            for i in range(len(ps)):
                if fmt == "dali":
                    diff = np.abs(ps.image(i).astype(float) - raw.image(i).astype(float))
                    assert diff.mean() < JPEG_MEAN_TOL, (split, i, diff.mean())
                else:
                    np.testing.assert_array_equal(ps.image(i), raw.image(i))


@pytest.mark.parametrize("csv_version,layout", [("v2020", "nested"), ("2017", "flat")])
def test_nih_roundtrip_raw(tmp_path, csv_version, layout, write_nih, block_mean):
    w = write_nih(tmp_path / "src", csv_version=csv_version, layout=layout)
    out = convert(tmp_path / "src", tmp_path / "out")
    check_against_reference(out, w, block_mean)
    m = json.loads((out / "manifest.json").read_text())
    csv_name = "Data_Entry_2017_v2020.csv" if csv_version == "v2020" else "Data_Entry_2017.csv"
    assert set(m["source_sha256"]) == {csv_name, "train_val_list.txt", "test_list.txt"}
    assert m["splits"]["train"]["count"] == 5 and m["splits"]["test"]["count"] == 3
    assert m["splits"]["train"]["prevalence"]["Cardiomegaly"] == pytest.approx(2 / 5)
    assert m["synthetic"] is False and m["formats"] == ["raw"] and m["skipped"] == []
    assert m["fasttrain_version"] and m["dataset"] == "nih-chestxray14"


def test_nih_all_formats_through_pool(tmp_path, nih_odd_pngs, write_nih, block_mean):
    """raw + ffcv + dali in one pass with 2 decode processes; RGBA and 16-bit PNGs included."""
    w = write_nih(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out", formats=("raw", "ffcv", "dali"), workers=2, shard_size=3)
    check_against_reference(out, w, block_mean)
    rgba, sixteen_bit = nih_odd_pngs
    assert rgba in w.ids["train"] and sixteen_bit in w.ids["test"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["formats"] == ["raw", "ffcv", "dali"]
    assert m["format_details"]["ffcv"]["image_field"] == "ndarray"
    # DALI shards: 3 samples each; the index offsets are where tarfile finds each member's data,
    # and the lbl / idx components hold the labels and the position
    ps = open_packed(out, "train", "dali")
    assert len(ps.shards) == 2 and len(ps.index_files) == 2
    for shard, idx in zip(ps.shards, ps.index_files):
        lines = Path(idx).read_text().splitlines()
        assert lines[0].split()[0] == "v1.2"
        with tarfile.open(shard) as tf:
            members = {mm.name: mm for mm in tf.getmembers()}
        for ln in lines[1:]:
            f = ln.split()
            for j in range(0, len(f), 4):
                ext, off, size, name = f[j], int(f[j + 1]), int(f[j + 2]), f[j + 3]
                assert name.endswith("." + ext) and members[name].offset_data == off and members[name].size == size
    for i in range(len(ps)):
        np.testing.assert_array_equal(np.frombuffer(ps.dali_component(i, "lbl"), "<f4"), ps.labels[i])
        assert int(np.frombuffer(ps.dali_component(i, "idx"), "<i8")[0]) == i
    # FFCV: the index field is the position
    from ffcv.reader import Reader
    r = Reader(open_packed(out, "test", "ffcv").beton)
    assert r.field_names == ["image", "label", "index"]
    assert list(r.metadata["f2"]) == [0, 1, 2]


def test_ffcv_only_drops_raw_staging(tmp_path, write_nih):
    write_nih(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out", formats=("ffcv",))
    m = json.loads((out / "manifest.json").read_text())
    assert m["formats"] == ["ffcv"] and not (out / "raw").exists()
    assert open_packed(out, "train").format == "ffcv"
    with pytest.raises(ValueError, match="format 'raw' was not written"):
        open_packed(out, "train", "raw")


def test_ffcv_import_keeps_torch_threads(tmp_path, write_nih):
    """FFCV's compiler module sets torch's threads to 1 on import; converting then training in the
    same process must keep every core (a fresh process: the import side effect happens once)."""
    write_nih(tmp_path / "src")
    code = ("import sys, torch; torch.set_num_threads(2)\n"
            "from fasttrain.converters.nih import convert_nih\n"
            "from fasttrain.data import open_packed\n"
            "out = convert_nih(sys.argv[1], sys.argv[2], formats=('ffcv',), size=32, progress=False)\n"
            "open_packed(out, 'train', 'ffcv').image(0)\n"
            "print(torch.get_num_threads())\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "2"


def test_xiao_split_files(tmp_path, write_nih, write_xiao_splits):
    w = write_nih(tmp_path / "src")
    parts = write_xiao_splits(tmp_path / "xiao", w)
    out = convert(tmp_path / "src", tmp_path / "out", split_dir=tmp_path / "xiao")
    for split, names in parts.items():
        ps = open_packed(out, split)
        assert ps.ids == names
    assert open_packed(out, "val").labels.shape == (1, 14)
    # a malformed line names the file and line
    (tmp_path / "xiao" / "test_official.txt").write_text("00000004_000.png 0 1\n")
    with pytest.raises(ConvertError, match=r"test_official.txt line 1"):
        convert(tmp_path / "src", tmp_path / "out2", split_dir=tmp_path / "xiao")


def test_val_fraction_is_patient_disjoint(tmp_path, write_nih):
    write_nih(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "out", val_fraction=0.3, seed=3)
    train, val = open_packed(out, "train"), open_packed(out, "val")
    pt = {i.split("_")[0] for i in train.ids}
    pv = {i.split("_")[0] for i in val.ids}
    assert pv and pt and not (pt & pv)
    assert len(train) + len(val) == 5


# ----------------------------------------------------------------------------- bad input

def _csv(src: Path) -> Path:
    return src / "Data_Entry_2017_v2020.csv"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("case,match", [
    ("missing_file", r"Data_Entry_2017_v2020.csv row 4 \(00000002_000.png\): image file 00000002_000.png not found"),
    ("truncated", r"Data_Entry_2017_v2020.csv row 2 \(00000001_000.png\): .*00000001_000.png: .*(truncated|broken|error)"),
    ("unknown_label", r"Data_Entry_2017_v2020.csv row 4 \(00000002_000.png\): unknown label 'Pneumonitis'"),
    ("missing_column", r"Data_Entry_2017_v2020.csv: missing column\(s\) \['Patient ID'\]"),
    ("not_in_lists", r"Data_Entry_2017_v2020.csv row 5: 00000003_000.png is in no split list"),
    ("duplicate", r"Data_Entry_2017_v2020.csv row 10: duplicate Image Index '00000001_000.png' "),
    ("list_not_in_csv", r"test_list.txt line 4: 00000099_000.png is not in Data_Entry_2017_v2020.csv"),
    ("empty_split", r"split 'test' is empty"),
])
def test_bad_input_names_file_and_row(tmp_path, case, match, write_nih):
    src = tmp_path / "src"
    w = write_nih(src)
    if case == "missing_file":
        w.files["00000002_000.png"].unlink()
    elif case == "truncated":
        data = w.files["00000001_000.png"].read_bytes()
        w.files["00000001_000.png"].write_bytes(data[: len(data) // 2])
    elif case == "unknown_label":
        _edit(_csv(src), "00000002_000.png,No Finding", "00000002_000.png,Pneumonitis")
    elif case == "missing_column":
        _edit(_csv(src), "Patient ID", "Patient")
    elif case == "not_in_lists":
        _edit(src / "train_val_list.txt", "00000003_000.png\n", "")
    elif case == "duplicate":
        with open(_csv(src), "a") as f:
            f.write("00000001_000.png,No Finding,0,1,40,M,PA,2500,2048,0.143,0.143\n")
    elif case == "list_not_in_csv":
        with open(src / "test_list.txt", "a") as f:
            f.write("00000099_000.png\n")
    elif case == "empty_split":
        (src / "test_list.txt").write_text("")
        (src / "train_val_list.txt").write_text("".join(i + "\n" for i in w.ids["train"] + w.ids["test"]))
    with pytest.raises(ConvertError, match=match):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.incomplete").exists()


def test_skip_records_items_in_manifest(tmp_path, write_nih):
    src = tmp_path / "src"
    w = write_nih(src)
    w.files["00000002_000.png"].write_bytes(b"\x89PNG not really")
    _edit(_csv(src), "00000003_001.png,Hernia", "00000003_001.png,Hernia|Bogus")
    out = convert(src, tmp_path / "out", on_error="skip", formats=("raw", "dali"))
    m = json.loads((out / "manifest.json").read_text())
    skipped = {s["id"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"00000002_000.png", "00000003_001.png"}
    assert "unknown label 'Bogus'" in skipped["00000003_001.png"]
    assert "row 4" in skipped["00000002_000.png"]
    ps = open_packed(out, "train")
    keep = [i for i in w.ids["train"] if i not in skipped]
    assert ps.ids == keep and len(ps) == 3 and ps.images.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(ps.labels, w.labels["train"][[w.ids["train"].index(i) for i in keep]])
    assert open_packed(out, "train", "dali").ids == keep


def test_existing_output_is_an_error(tmp_path, write_nih):
    write_nih(tmp_path / "src")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConvertError, match="output folder already exists"):
        convert(tmp_path / "src", tmp_path / "out")


def test_bad_options(tmp_path, write_nih):
    write_nih(tmp_path / "src")
    with pytest.raises(ConvertError, match="unknown format"):
        convert(tmp_path / "src", tmp_path / "out", formats=("tfrecord",))
    with pytest.raises(ConvertError, match="--on-error"):
        convert(tmp_path / "src", tmp_path / "out", on_error="ignore")
    with pytest.raises(ConvertError, match="source folder not found"):
        convert(tmp_path / "nope", tmp_path / "out")


# ----------------------------------------------------------------------------- atomicity

def test_interrupt_leaves_no_manifest_and_rerun_is_clean(tmp_path, monkeypatch, write_nih, block_mean):
    """An exception mid-way (Ctrl-C) removes the partial folder; a SIGKILL leaves only the hidden
    `.incomplete` sibling (no manifest anywhere), which the next run removes."""
    src = tmp_path / "src"
    w = write_nih(src)
    import fasttrain.converters.nih as nih
    calls = {"n": 0}

    def flaky(path, size):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return nih.decode_raster(path, size)
    monkeypatch.setattr(nih, "decode_raster", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()
    monkeypatch.undo()

    # SIGKILL in the middle of the raw write, in a child process
    script = (
        "import os, signal, sys\n"
        "import fasttrain.converters.nih as nih\n"
        "real = nih.decode_raster\n"
        "n = [0]\n"
        "def dying(path, size):\n"
        "    n[0] += 1\n"
        "    if n[0] == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, size)\n"
        "nih.decode_raster = dying\n"
        f"nih.convert_nih({str(src)!r}, {str(tmp_path / 'out')!r}, size={SIZE}, workers=0, progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    partial = tmp_path / ".out.incomplete"
    assert partial.is_dir() and not list(partial.rglob("manifest.json"))
    with pytest.raises(ValueError, match="interrupted conversion"):
        open_packed(partial.parent / "out")
    out = convert(src, tmp_path / "out")
    assert not partial.exists()
    check_against_reference(out, w, block_mean)


# ----------------------------------------------------------------------------- CLI

def test_cli_convert_nih(tmp_path, capsys, write_nih):
    from fasttrain.cli import main
    write_nih(tmp_path / "src")
    rc = main(["convert", "nih", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "16",
               "--format", "raw", "ffcv", "dali", "--workers", "0", "--no-progress", "--val-fraction", "0.4"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "packed nih-chestxray14" in captured.out
    assert "%|" not in captured.err, captured.err  # --no-progress silences FFCV's own bar too
    assert open_packed(tmp_path / "out", "val", "dali").image(0).shape == (16, 16)
    # an error is one line naming the problem, exit code 1
    rc = main(["convert", "nih", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1
    assert "output folder already exists" in capsys.readouterr().err


def _die_on_one(path, size):
    if path.endswith("00000002_000.png"):
        os._exit(3)  # a decoder crashing the process (segfault, OOM kill)
    from fasttrain.converters.decode import decode_raster
    return decode_raster(path, size)


def test_dead_worker_is_an_error_not_a_hang(tmp_path, monkeypatch, write_nih):
    import fasttrain.converters.nih as nih
    write_nih(tmp_path / "src")
    monkeypatch.setattr(nih, "decode_raster", _die_on_one)
    with pytest.raises(ConvertError, match="a worker process died"):
        convert(tmp_path / "src", tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()


def test_sigterm_through_cli_removes_partial_output(tmp_path, write_nih):
    """SIGTERM (a scheduler's kill) mid-conversion: exit code 130, no output, no leftovers."""
    src = tmp_path / "src"
    write_nih(src)
    script = (
        "import os, signal, sys\n"
        "import fasttrain.converters.nih as nih\n"
        "real = nih.decode_raster\n"
        "n = [0]\n"
        "def stopping(path, size):\n"
        "    n[0] += 1\n"
        "    if n[0] == 5:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(path, size)\n"
        "nih.decode_raster = stopping\n"
        "from fasttrain.cli import main\n"
        f"sys.exit(main(['convert', 'nih', '--src', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}, "
        "'--workers', '0', '--no-progress', '--size', '16']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_nih_files_as_edited_on_windows(tmp_path, write_nih, block_mean):
    """Lists with a BOM and CRLF, no final newline; a CSV with a BOM and CRLF; labels with doubled
    or non-breaking spaces: same result as the clean files."""
    w = write_nih(tmp_path / "src")
    src = tmp_path / "src"
    for name in ("train_val_list.txt", "test_list.txt"):
        lines = (src / name).read_text().splitlines()
        (src / name).write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    csvp = src / "Data_Entry_2017_v2020.csv"
    text = csvp.read_text()
    text = text.replace("No Finding", "No\u00a0Finding", 1).replace("Cardiomegaly|Emphysema", " Cardiomegaly |  Emphysema")
    csvp.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert "No\u00a0Finding" in text and " Cardiomegaly |  Emphysema" in text
    out = convert(src, tmp_path / "out")
    check_against_reference(out, w, block_mean)


def test_unreadable_csv_names_the_file(tmp_path):
    from fasttrain.converters.common import read_csv
    bad = tmp_path / "Data_Entry_2017.csv"
    bad.write_bytes(b"Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass\xe9,1\n")  # Latin-1
    with pytest.raises(ConvertError, match=r"Data_Entry_2017.csv: cannot read as a UTF-8 CSV: UnicodeDecodeError"):
        read_csv(bad, [])
    (tmp_path / "x.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(ConvertError, match=r"x.csv.gz: cannot read as a UTF-8 CSV: BadGzipFile"):
        read_csv(tmp_path / "x.csv.gz", [])


def test_concurrent_conversion_to_the_same_out_is_refused(tmp_path, write_nih, block_mean):
    """A second run must not delete the first one's temporary folder (and let the first rename a
    mix of both): it stops, naming the lock; the first finishes intact."""
    from fasttrain.converters.common import AtomicDir
    w = write_nih(tmp_path / "src")
    with AtomicDir(tmp_path / "out") as tmp:  # a conversion in progress
        (tmp / "marker").write_text("first")
        with pytest.raises(ConvertError, match=r"out: another conversion is writing it right now \(lock .*\.out\.lock\)"):
            convert(tmp_path / "src", tmp_path / "out")
        assert (tmp / "marker").read_text() == "first"  # its temporary folder untouched
    assert (tmp_path / "out" / "marker").is_file() and not (tmp_path / ".out.lock").exists()
    with pytest.raises(ConvertError, match="output folder already exists"):
        convert(tmp_path / "src", tmp_path / "out")
    out = convert(tmp_path / "src", tmp_path / "out2")
    check_against_reference(out, w, block_mean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "src"]  # no lock or temp left


def test_sixteen_bit_png_honours_sbit(tmp_path, block_mean):
    """A 12-bit radiograph saved as a 16-bit PNG with sBIT=12 maps 0..4095 to 0..255 (not to a
    nearly black 0..16); without sBIT the full 16-bit range is used."""
    from PIL import Image, PngImagePlugin
    from fasttrain.converters.decode import decode_raster, png_significant_bits
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4096, (32, 32)).astype(np.uint16)
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    Image.fromarray(img).save(tmp_path / "twelve.png", pnginfo=info)
    Image.fromarray(img).save(tmp_path / "plain.png")
    assert png_significant_bits(str(tmp_path / "twelve.png")) == 12
    assert png_significant_bits(str(tmp_path / "plain.png")) is None
    ref = block_mean(img.astype(np.float64), 16)
    got = decode_raster(str(tmp_path / "twelve.png"), 16).astype(float)
    assert np.abs(got - ref * 255 / 4095).max() <= 1.0
    got = decode_raster(str(tmp_path / "plain.png"), 16).astype(float)
    assert np.abs(got - ref * 255 / 65535).max() <= 1.0


def test_decode_file_dispatches_by_suffix(tmp_path):
    """decode_file: PNG/JPEG through the raster decoder, an unknown suffix named in the error."""
    from PIL import Image

    from fasttrain.converters.decode import decode_file, decode_raster
    img = (np.arange(40 * 30) % 251).astype(np.uint8).reshape(40, 30)
    png = tmp_path / "a.PNG"
    Image.fromarray(img).save(png)
    np.testing.assert_array_equal(decode_file(str(png), 16), decode_raster(str(png), 16))
    bad = tmp_path / "a.tiff"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported file type '.tiff'"):
        decode_file(str(bad), 16)
