"""The files the core writes go through fasttrain.io's atomic writes: complete or absent, never a
temp file left behind, and a checkpoint's second name made before the rename."""
from __future__ import annotations

import errno
import os

import pytest
import torch
import yaml

from fasttrain.config import Config
from fasttrain.train import checkpoint as ckpt_io
from fasttrain.train.checkpoint import CheckpointWriteError, load_checkpoint, save_atomic
from fasttrain.train.runlog import save_figure


def test_checkpoint_and_its_second_name_share_the_bytes(tmp_path):
    path, also = tmp_path / "last.pt", tmp_path / "step_00000004.pt"
    save_atomic({"model": {"w": torch.arange(3.0)}, "step": 4}, path, also=also)
    assert path.read_bytes() == also.read_bytes()
    assert load_checkpoint(also)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_00000004.pt"]


def test_a_second_name_that_cannot_be_written_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(2)}}, path)

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ckpt_io, "_link_or_copy", full)
    with pytest.raises(CheckpointWriteError, match="no space left on the device\\); the previous one is intact"):
        save_atomic({"model": {"w": torch.zeros(2)}}, path, also=tmp_path / "step_00000002.pt")
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_config_save_writes_the_yaml_whole(tmp_path):
    cfg = Config()
    cfg.optim.blr = 3e-4
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["blr"] == 3e-4
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_save_figure_writes_a_png_and_closes_it(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]
    assert not plt.fignum_exists(fig.number)
