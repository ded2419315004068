"""Packed datasets and the loaders that read them.

`open_packed` reads what the converters wrote (manifest + packed files); `build_loader` turns a
packed split into device batches. Nothing here reads a source dataset.
"""


from fasttrain.format.packed import open_packed


def build_loader(*args, **kwargs):
    """fasttrain.data.loaders.build_loader, imported on first use: it imports torch, which reading
    a packed split (open_packed, the mixture helpers) does not need."""
    from .loaders import build_loader as build
    return build(*args, **kwargs)


__all__ = ["open_packed", "build_loader"]
