"""timm's RandAugment ops as the oracle for ours: one op on one PIL image, the sign fixed."""
from __future__ import annotations

from PIL import Image
from timm.data import auto_augment as taa


def timm_op(name: str, img: Image.Image, magnitude: float, negate: bool, hparams: dict) -> Image.Image:
    """timm's AugmentOp body without the apply draw, with `_randomly_negate` fixed to `negate`;
    PosterizeIncreasing at 0 bits gives black (our decision, fasttrain.data.randaug: Pillow
    refuses it)."""
    orig = taa._randomly_negate
    taa._randomly_negate = lambda v: -v if negate else v
    try:
        level_fn = taa.LEVEL_TO_ARG[name]
        args = level_fn(magnitude, hparams) if level_fn is not None else tuple()
        if name.startswith("Posterize") and args[0] == 0:
            return Image.new(img.mode, img.size)
        return taa.NAME_TO_OP[name](img, *args, fillcolor=hparams["img_mean"], resample=hparams["interpolation"])
    finally:
        taa._randomly_negate = orig
