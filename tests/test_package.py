"""The install layout: converters/ and kernels/ import as fasttrain.converters / fasttrain.kernels,
both from the editable install (this venv) and from a normal (non-editable) install."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_editable_install_maps_subpackages():
    import fasttrain.converters
    import fasttrain.kernels
    assert Path(fasttrain.converters.__file__).resolve().parent == ROOT / "converters"
    assert Path(fasttrain.kernels.__file__).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_normal_install_imports_subpackages(tmp_path):
    target = tmp_path / "site"
    # --no-deps: the venv already has the dependencies; this checks the package layout only.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True)
    assert (target / "fasttrain" / "converters" / "__init__.py").is_file()
    assert (target / "fasttrain" / "kernels" / "__init__.py").is_file()
    assert not (target / "converters").exists() and not (target / "kernels").exists(), \
        "generic top-level names must not land in site-packages"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fasttrain.converters, fasttrain.kernels; "
            "print(fasttrain.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(target)], check=True, capture_output=True,
                         text=True, cwd=tmp_path).stdout
    assert str(target) in out


def test_cli_lists_commands_and_rejects_unknown(capsys):
    from fasttrain.cli import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("convert", "pretrain", "finetune", "evaluate", "bench", "demo"):
        assert cmd in out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_the_readme_public_api_imports_from_where_it_documents_it():
    """The names the README documents stay where it says they are, whatever the package layout."""
    import importlib

    api = {"fasttrain.config": ["build_config"], "fasttrain.data": ["build_loader", "open_packed", "randaug"],
           "fasttrain.models": ["create_model", "param_groups_layer_decay"],
           "fasttrain.models.checkpoints": ["load_mae", "load_teacher"],
           "fasttrain.losses": ["masked_mse", "feature_align_l1"], "fasttrain.kernels": ["masked_gather", "l1_align"]}
    for module, names in api.items():
        mod = importlib.import_module(module)
        for name in names:
            if not hasattr(mod, name):  # a submodule (fasttrain.data.randaug)
                importlib.import_module(f"{module}.{name}")
