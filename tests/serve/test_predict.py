"""`fasttrain predict` on the `trained` classifier: predict == evaluate on the packed test split;
unreadable files listed with the reason; a checkpoint without a classifier head is refused before
any work; a mixture-trained checkpoint predicts and exports like the single-dataset one."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch


def test_predict_equals_evaluate_on_packed_test_split(trained, tmp_path, capsys, trained_labels):
    from fasttrain.format.packed import open_packed, read_manifest
    from fasttrain.metrics import bootstrap_auc
    from fasttrain.eval.evaluate import evaluate_checkpoint
    from fasttrain.serve.predict import main
    packed, ckpt, _, src = trained
    res = evaluate_checkpoint(ckpt, packed, "test", tmp_path / "eval", n_boot=50)
    want = np.load(tmp_path / "eval" / "scores_test.npy")  # [N, C] evaluate's scores, in packed order
    ps = open_packed(packed, "test", "raw")
    source = Path(read_manifest(packed)["source"])
    files = (packed / "splits" / "test.files.txt").read_text().splitlines()
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([[str(source / p)] for p in files])
    # another batch size than evaluate's, and a second worker process: same scores
    assert main(["--ckpt", str(ckpt), "--list", str(tmp_path / "list.csv"), "--out", str(tmp_path / "pred.csv"),
                 "--batch-size", "5", "--workers", "2", "--no-progress"]) == 0
    assert "with 2 decode worker(s)" in capsys.readouterr().out  # the spawned pool, not the in-process path
    with open(tmp_path / "pred.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "path", *trained_labels, "error"]  # names from the checkpoint
    got = np.array([[float(r[n]) for n in trained_labels] for r in rows])
    assert len(rows) == len(ps.ids) and all(r["error"] == "" for r in rows)
    assert want.std(axis=0).min() > 0.05  # the scores differ between images: the comparison means something
    np.testing.assert_allclose(got, want, atol=2e-6)  # CSV keeps 6 decimals
    again = bootstrap_auc(ps.labels, got, trained_labels, n_boot=50)
    assert again["mauc"] == pytest.approx(res["mauc"], abs=1e-6)


def test_predict_folder_lists_unreadable_files_with_reason(trained, tmp_path, trained_labels):
    from fasttrain.serve.predict import main
    _, ckpt, _, src = trained
    d = tmp_path / "new"
    d.mkdir()
    for name in ("p0/img0.png", "p1/img3.dcm", "p1/img2.jpg"):
        (d / Path(name).name).write_bytes((src / name).read_bytes())
    (d / "broken.png").write_bytes((src / "p0/img0.png").read_bytes()[:60])  # truncated
    (d / "notes.txt").write_text("not an image")  # not an image suffix: not listed
    (d / "sub").mkdir()
    (d / "sub" / "fake.dcm").write_bytes(b"\x00" * 300)
    assert main(["--ckpt", str(ckpt), "--images", str(d), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["broken.png", "img0.png", "img2.jpg", "img3.dcm", "sub/fake.dcm"]
    for bad in ("broken.png", "sub/fake.dcm"):
        assert rows[bad]["error"] and all(rows[bad][n] == "" for n in trained_labels)
    assert "not a readable DICOM" in rows["sub/fake.dcm"]["error"]
    for ok in ("img0.png", "img2.jpg", "img3.dcm"):
        assert rows[ok]["error"] == "" and all(0 < float(rows[ok][n]) < 1 for n in trained_labels)
    # --list: paths relative to the CSV's folder; a file that is not there keeps its row
    (d / "list.csv").write_text("path\nimg0.png\nmissing.png\nsub/fake.dcm\n")
    assert main(["--ckpt", str(ckpt), "--list", str(d / "list.csv"), "--out", str(tmp_path / "l.csv"),
                 "--no-progress"]) == 0
    with open(tmp_path / "l.csv", newline="") as f:
        listed = list(csv.DictReader(f))
    assert [r["id"] for r in listed] == ["img0.png", "missing.png", "sub/fake.dcm"]
    assert listed[0]["Mass"] == rows["img0.png"]["Mass"] and "file not found" in listed[1]["error"]
    import json
    prov = json.loads((tmp_path / "l.csv.json").read_text())
    assert prov["unreadable"] == 2 and prov["eval_transform"]["img_size"] == 32 and "git_sha" in prov["provenance"]
    # nothing readable at all: the CSV still lists every file with its reason, and the exit code is 1
    (d / "bad.csv").write_text("path\nmissing.png\nsub/fake.dcm\n")
    assert main(["--ckpt", str(ckpt), "--list", str(d / "bad.csv"), "--out", str(tmp_path / "b.csv"),
                 "--no-progress"]) == 1
    with open(tmp_path / "b.csv", newline="") as f:
        assert [bool(r["error"]) for r in csv.DictReader(f)] == [True, True]


def test_predict_and_export_bad_input_before_any_work(trained, tmp_path, capsys):
    from fasttrain.serve.export import main as export_main
    from fasttrain.serve.predict import main
    packed, ckpt, pre, src = trained
    assert main(["--ckpt", str(pre), "--images", str(src), "--out", str(tmp_path / "p.csv")]) == 2
    assert "no classifier head" in capsys.readouterr().err
    assert export_main(["--ckpt", str(pre), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no classifier head" in capsys.readouterr().err
    (tmp_path / "l.csv").write_text("file,x\na.png,1\n")
    assert main(["--ckpt", str(ckpt), "--list", str(tmp_path / "l.csv"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "missing column(s) ['path']; found ['file', 'x']" in capsys.readouterr().err
    assert main(["--ckpt", str(ckpt), "--images", str(tmp_path / "none"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "folder not found" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.cuda
def test_predict_on_cuda_matches_cpu(trained, tmp_path):
    """The device path (pinned uint8 batch, BatchAugment and the model on the GPU) against CPU;
    both run under the checkpoint's bf16 autocast, hence the loose tolerance."""
    from fasttrain.serve.predict import list_images, predict_files
    _, ckpt, _, src = trained
    items = list_images(src)
    a = predict_files(ckpt, items, tmp_path / "cpu.csv", device="cpu", batch_size=7, progress=False)
    b = predict_files(ckpt, items, tmp_path / "gpu.csv", device="cuda", batch_size=7, progress=False)
    assert a["errors"] == b["errors"] == [None] * len(items)
    assert np.abs(a["probs"] - b["probs"]).mean() < 1e-2 and np.abs(a["probs"] - b["probs"]).max() < 0.05


def test_predict_and_export_a_mixture_trained_classifier(trained, tmp_path, trained_labels, trained_size):
    """Fine-tuning on a mixture saves data.path as a list of parts: predict and export read its
    manifest (label names, packed size) and give the single-dataset checkpoint's results."""
    from fasttrain.train.checkpoint import save_atomic
    from fasttrain.serve.export import main as export_main
    from fasttrain.serve.predict import load_for_inference
    from fasttrain.serve.predict import main as predict_main
    packed, ckpt, _, src = trained
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["config"]["data"]["path"] = [f"{packed}:train", f"{packed}:test"]
    del ck["image_size"], ck["label_names"]  # so the size and names come from the parts' manifest
    save_atomic(ck, tmp_path / "mix.pt")
    _, cfg, names, size = load_for_inference(tmp_path / "mix.pt")
    assert isinstance(cfg.data.path, list) and names == trained_labels and size == trained_size
    for name, c in (("one", ckpt), ("mix", tmp_path / "mix.pt")):
        assert predict_main(["--ckpt", str(c), "--images", str(src), "--out", str(tmp_path / f"{name}.csv"),
                             "--workers", "1", "--no-progress"]) == 0
    assert (tmp_path / "mix.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert export_main(["--ckpt", str(tmp_path / "mix.pt"), "--format", "timm",
                        "--out", str(tmp_path / "mix.safetensors")]) == 0
