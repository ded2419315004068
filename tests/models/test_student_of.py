"""distill.student_of: the model that learns, for an ETMAE and for every other model."""
from __future__ import annotations

import torch

from fasttrain.models import ETMAE, student_of
from fasttrain.train.engine import unwrap


def test_an_etmae_has_its_student_every_other_model_is_its_own(tiny_model):
    student, teacher = tiny_model(), tiny_model("mae_vit_small_patch16", embed_dim=96, num_heads=4)
    e = ETMAE(student, teacher, [1], [1])
    assert student_of(e) is student and student_of(e) is not teacher
    assert student_of(student) is student
    clf = tiny_model("vit_tiny_patch16", num_classes=3)
    assert student_of(clf) is clf


def test_wrappers_are_unwrapped_by_the_caller(tiny_model):
    e = ETMAE(tiny_model(), tiny_model("mae_vit_small_patch16", embed_dim=96, num_heads=4), [1], [1])
    compiled = torch.compile(e)  # not run: only the wrapper
    assert student_of(compiled) is compiled  # no hidden unwrap: engine.unwrap first
    assert student_of(unwrap(compiled)) is e.student
