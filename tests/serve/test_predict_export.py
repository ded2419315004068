"""`fasttrain predict` and `fasttrain export`: on a dataset packed by `convert images` (8-bit PNG,
16-bit PNG, JPEG, DICOM) and a classifier fine-tuned on it by `run_finetune`: predict == evaluate
on the packed test split; unreadable files listed with the reason; timm export loads strictly in
timm with equal logits; ONNX logits (ONNX Runtime) equal PyTorch's, at two batch sizes; a
checkpoint without a classifier head is refused before any work."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.config import build_config

SIDE, SIZE = 40, 32
LABELS = ["Effusion", "Mass", "Nodule"]


def _write_sources(root: Path, gray_pattern, write_dicom_file, n: int = 24) -> Path:
    """n images in four file kinds + labels.csv (path, one 0/1 column per label, patient)."""
    import cv2
    from PIL import Image
    rng = np.random.default_rng(5)
    rows = []
    for k in range(n):
        g = gray_pattern(rng, SIDE, SIDE, k)
        y = rng.integers(0, 2, len(LABELS))
        g[SIDE // 2:, : SIDE // 2] = 255 if y[0] else g[SIDE // 2:, : SIDE // 2]  # a visible sign of label 0
        kind = k % 4
        rel = f"p{k // 2}/img{k}." + ("png", "png", "jpg", "dcm")[kind]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == 0:
            Image.fromarray(g, "L").save(path)
        elif kind == 1:
            assert cv2.imwrite(str(path), g.astype(np.uint16) * 257)  # 16-bit
        elif kind == 2:
            Image.fromarray(g, "L").save(path, quality=95)
        else:
            write_dicom_file(path, g.astype(np.uint16) * 16, bits_stored=12, photometric="MONOCHROME2")
        rows.append([rel, *[str(int(v)) for v in y], f"p{k // 2}"])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *LABELS, "patient"])
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_yaml, gray_pattern, write_dicom_file):
    """(packed dataset, fine-tuned best/last checkpoint, pretrain checkpoint, source folder)."""
    from fasttrain.converters.images import convert_images
    from fasttrain.train.builders import build_student
    from fasttrain.train.checkpoint import save_atomic
    from fasttrain.train.finetune import run_finetune
    root = tmp_path_factory.mktemp("byod")
    src = root / "src"
    labels_csv = _write_sources(src, gray_pattern, write_dicom_file)
    packed = convert_images(src, labels_csv, root / "packed", path_col="path", label_cols=LABELS,
                            patient_col="patient", test_fraction=0.5, size=SIZE, workers=1, progress=False)
    (root / "tiny.yaml").write_text(tiny_yaml("vit", data={"val_split": None}))
    cfg = build_config(root / "tiny.yaml", [f"--data.path={packed}", f"--run.out={root / 'ft'}"])
    summary = run_finetune(cfg)
    # one epoch leaves the head near its 2e-5 init (scores ~0.5 +- 1e-3); spread the scores so that
    # any difference in decoding or transform between predict and evaluate shows
    ck = torch.load(summary["last"], map_location="cpu", weights_only=True)
    ck["model"]["head.weight"] *= 2000.0
    save_atomic(ck, summary["last"])
    mae = build_config(root / "tiny.yaml", ["--model.name=mae_vit_tiny_patch16", "--model.decoder_embed_dim=32",
                                            "--model.decoder_depth=1", "--model.decoder_num_heads=2"])
    save_atomic({"kind": "pretrain", "model": build_student(mae).state_dict(), "config": mae.to_dict()},
                root / "pre" / "last.pt")
    return packed, Path(summary["last"]), root / "pre" / "last.pt", src


def test_predict_equals_evaluate_on_packed_test_split(trained, tmp_path, capsys):
    from fasttrain.format.packed import open_packed, read_manifest
    from fasttrain.eval.evaluate import bootstrap_auc
    from fasttrain.train.finetune import evaluate_checkpoint
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
    assert list(rows[0]) == ["id", "path", *LABELS, "error"]  # names from the checkpoint
    got = np.array([[float(r[n]) for n in LABELS] for r in rows])
    assert len(rows) == len(ps.ids) and all(r["error"] == "" for r in rows)
    assert want.std(axis=0).min() > 0.05  # the scores differ between images: the comparison means something
    np.testing.assert_allclose(got, want, atol=2e-6)  # CSV keeps 6 decimals
    again = bootstrap_auc(ps.labels, got, LABELS, n_boot=50)
    assert again["mauc"] == pytest.approx(res["mauc"], abs=1e-6)


def test_predict_folder_lists_unreadable_files_with_reason(trained, tmp_path):
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
        assert rows[bad]["error"] and all(rows[bad][n] == "" for n in LABELS)
    assert "not a readable DICOM" in rows["sub/fake.dcm"]["error"]
    for ok in ("img0.png", "img2.jpg", "img3.dcm"):
        assert rows[ok]["error"] == "" and all(0 < float(rows[ok][n]) < 1 for n in LABELS)
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


def test_export_timm_classifier_and_encoder_load_strictly_in_timm(trained, tmp_path):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fasttrain.serve.export import main
    from fasttrain.serve.predict import load_for_inference
    _, ckpt, pre, _ = trained
    assert main(["--ckpt", str(ckpt), "--format", "timm", "--out", str(tmp_path / "clf.safetensors")]) == 0
    import json
    with safe_open(str(tmp_path / "clf.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["label_names"]) == LABELS
    net = timm.models.VisionTransformer(**json.loads(meta["timm_kwargs"]))
    net.load_state_dict(load_file(str(tmp_path / "clf.safetensors")), strict=True)
    ours = load_for_inference(ckpt)[0]
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ours(x), rtol=0, atol=1e-5)
    # a pre-training checkpoint: the encoder, as `export_timm` writes it (num_classes=0)
    assert main(["--ckpt", str(pre), "--format", "timm", "--out", str(tmp_path / "enc.safetensors")]) == 0
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        kw = json.loads(f.metadata()["timm_kwargs"])
    assert kw["num_classes"] == 0
    timm.models.VisionTransformer(**kw).load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)


def _onnx_vs_torch(trained, tmp_path, exporter: str):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fasttrain[onnx]')")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")
    from fasttrain.serve.export import export_checkpoint, onnx_runtime_available
    _, ckpt, _, _ = trained
    res = export_checkpoint(ckpt, "onnx", tmp_path / "m.onnx", exporter=exporter)
    assert (tmp_path / "m.onnx").is_file()
    why = onnx_runtime_available()
    if why is not None:
        assert res["not_checked"] == why
        pytest.skip(why)
    assert res["max_abs_diff"] < 1e-4 and res["batch_sizes"] == [1, 3]  # dynamic batch axis
    # and on real inputs: the predict pipeline's tensors through ONNX Runtime == the model's logits
    import json

    import onnx
    import onnxruntime as ort
    from fasttrain.format.packed import open_packed
    from fasttrain.serve.predict import Predictor, load_for_inference
    model, cfg, names, size = load_for_inference(ckpt)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["label_names"] == '["Effusion", "Mass", "Nodule"]' and "center-cropped" in meta["input"]
    assert "git_sha" in json.loads(meta["provenance"])
    pred = Predictor(model, cfg, size, torch.device("cpu"))
    imgs = np.stack([open_packed(trained[0], "test", "raw").image(i) for i in range(5)])  # [5, S, S]
    x = pred.augment(torch.from_numpy(imgs))  # [5, 1, 32, 32]
    with torch.no_grad():
        want = model.float()(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": x.contiguous().numpy()})[0]
    assert np.abs(got - want).max() < 1e-4


def test_onnx_torchscript_exporter_matches_pytorch(trained, tmp_path):
    _onnx_vs_torch(trained, tmp_path, "torchscript")


@pytest.mark.slow
def test_onnx_dynamo_exporter_matches_pytorch(trained, tmp_path):
    _onnx_vs_torch(trained, tmp_path, "dynamo")


def test_onnx_export_without_onnxruntime_says_why(trained, tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="onnx is not installed")
    from fasttrain.serve.export import export_checkpoint
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    res = export_checkpoint(trained[1], "onnx", tmp_path / "m.onnx", exporter="torchscript")
    assert res["max_abs_diff"] is None and "onnxruntime is not installed" in res["not_checked"]
    assert (tmp_path / "m.onnx").is_file()


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


def test_predict_and_export_a_mixture_trained_classifier(trained, tmp_path):
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
    assert isinstance(cfg.data.path, list) and names == LABELS and size == SIZE
    for name, c in (("one", ckpt), ("mix", tmp_path / "mix.pt")):
        assert predict_main(["--ckpt", str(c), "--images", str(src), "--out", str(tmp_path / f"{name}.csv"),
                             "--workers", "1", "--no-progress"]) == 0
    assert (tmp_path / "mix.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert export_main(["--ckpt", str(tmp_path / "mix.pt"), "--format", "timm",
                        "--out", str(tmp_path / "mix.safetensors")]) == 0
