"""`fasttrain export` of the `trained` classifier: the timm export loads strictly in timm with equal
logits; ONNX logits (ONNX Runtime) equal PyTorch's, at two batch sizes."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch


def test_export_timm_classifier_and_encoder_load_strictly_in_timm(trained, tmp_path, trained_labels):
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
    assert json.loads(meta["label_names"]) == trained_labels
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
