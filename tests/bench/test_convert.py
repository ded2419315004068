"""`fasttrain bench convert` runs on tiny counts of full-size SYNTHETIC sources and prints
well-formed JSON (no timing asserted); its sources are in the layouts the converters read."""
import json

import numpy as np
import pytest

from fasttrain.bench import convert as B

KEYS = {"bench", "mode", "kind", "images_per_s", "mb_per_s", "ratio_vs_reference", "pct_of_decode_only",
        "peak_rss_mib", "hours_on_32_cores", "synthetic", "provenance"}


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("kind", ["nih-png", "mimic-jpg"])
def test_bench_convert_json(kind, capsys, tmp_path, monkeypatch):
    from fasttrain.bench import main
    assert main(["convert", "--kind", kind, "--n", "3", "--repeats", "1", "--workers", "2", "--json",
                 "--dir", str(tmp_path / "src")]) == 0
    recs = _records(capsys.readouterr().out)
    assert [r["mode"] for r in recs] == ["reference", "fasttrain", "decode-only", "pipeline-only"]
    for r in recs:
        assert KEYS <= r.keys() and r["bench"] == "convert" and r["kind"] == kind and r["synthetic"] is True
        assert r["images_per_s"] > 0 and r["peak_rss_mib"] > 0 and r["hours_on_32_cores"] > 0
    assert recs[0]["ratio_vs_reference"] == 1.0 and recs[2]["pct_of_decode_only"] == 100.0
    # sources at the real size, reused on a second run (stamp file)
    k = B.KINDS[kind]
    assert recs[0]["source_hw"] == [k.h, k.w]
    assert (tmp_path / "src" / f".bench-{kind}-3").is_file()

    def no_write(*a, **k):
        raise AssertionError("the sources were written again")
    monkeypatch.setattr(B, "write_sources", no_write)
    assert main(["convert", "--kind", kind, "--n", "3", "--repeats", "1", "--workers", "2", "--json",
                 "--dir", str(tmp_path / "src")]) == 0
    assert [r["mode"] for r in _records(capsys.readouterr().out)] == [r["mode"] for r in recs]


def test_bench_sources_convert_and_match_reference(tmp_path):
    """The DICOM kind's sources pack through `fasttrain convert dicom` (published MIMIC CSVs);
    fasttrain's pixels and the naive reference agree closely (same image, different resize)."""
    paths = B.write_sources("dicom", 2, tmp_path / "src", workers=0)
    assert all(p.suffix == ".dcm" for p in paths)
    assert B.convert_fasttrain("dicom", tmp_path / "src", tmp_path / "out", 64, 0) == 2
    from fasttrain.data import open_packed
    img = open_packed(tmp_path / "out", "train").image(0).astype(float)
    assert B.default_resize("dicom") == "crop"  # the converter's default: the baseline fits the same way
    ref = B.reference_decode(str(paths[0]), 64, "crop").astype(float)
    assert np.abs(img - ref).mean() < 8.0  # window vs min..max and resize filters differ; same picture
    squashed = B.reference_decode(str(paths[0]), 64, "squash").astype(float)
    assert np.abs(img - squashed).mean() > np.abs(img - ref).mean()  # a portrait frame: crop is not squash
    assert B.decode_only(str(paths[0]), 64) == B.KINDS["dicom"].h * B.KINDS["dicom"].w


def test_bench_convert_plan_and_budget(capsys, tmp_path):
    """The plan comes first (stderr); a budget too small for a second round stops every mode after
    one, with a note in its row; --full keeps every round."""
    from fasttrain.bench import main
    base = ["convert", "--kind", "nih-png", "--n", "2", "--repeats", "2", "--workers", "1", "--json",
            "--dir", str(tmp_path / "src")]
    assert main(base + ["--budget", "1e-9"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("plan: 2 SYNTHETIC nih-png sources (1024x1024, 8-bit)")
    assert "x 2 interleaved rounds" in err and "budget 1e-09 s" in err
    recs = _records(out)
    assert len(recs) == 4
    for r in recs:
        assert len(r["images_per_s_runs"]) == 1 and r["note"].startswith("stopped after 1 of 2 windows")
    assert main(base + ["--full"]) == 0
    out, err = capsys.readouterr()
    assert "no budget" in err
    assert all(len(r["images_per_s_runs"]) == 2 and r["note"] is None for r in _records(out))
