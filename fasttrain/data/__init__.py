"""Packed datasets and the loaders that read them.

`open_packed` reads what the converters wrote (manifest + packed files); `build_loader` turns a
packed split into device batches. Nothing here reads a source dataset.
"""


def open_packed(*args, **kwargs):
    from fasttrain.format.packed import open_packed as _open_packed
    return _open_packed(*args, **kwargs)


def build_loader(*args, **kwargs):
    from .loaders import build_loader as _build_loader
    return _build_loader(*args, **kwargs)


__all__ = ["open_packed", "build_loader"]
