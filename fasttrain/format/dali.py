"""The DALI format: webdataset tar shards + DALI index files, JPEG-encoded from the raw memmap.

Each sample `<key>` (the zero-padded position in the split, so keys sort in split order) holds
  <key>.jpg  single-channel baseline JPEG (quality `jpeg_quality`, default 95)
  <key>.lbl  little-endian float32 [C] labels (NaN = ignored)
  <key>.idx  little-endian int64 position in the split
`fn.readers.webdataset(paths=shards, index_paths=index_files, ext=["jpg", "lbl", "idx"],
dtypes=[UINT8, FLOAT, INT64], shard_id=rank, num_shards=world)` reads them; `fn.decoders.image`
decodes the JPEG ('mixed' on GPU, 'cpu' otherwise).

We write the index files ourselves instead of running DALI's `wds2idx` (which shells out to GNU
tar twice per shard): we know each member's data offset as we write it. Format "v1.2": a line
"v1.2 <samples>", then per sample one line of "<ext> <data offset> <size> <member name>" per
component, space separated.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from fasttrain.format import raw
from fasttrain.format.manifest import WriteError, split_paths
from fasttrain.pool import bounded_imap, progress

INDEX_VERSION = "v1.2"
EXTENSIONS = ("jpg", "lbl", "idx")
_KEY = "{:09d}"


def shard_name(split: str, k: int) -> str:
    return f"dali/{split}-{k:05d}.tar"


def index_name(split: str, k: int) -> str:
    return f"dali/{split}-{k:05d}.idx"


_ENC_STATE: dict = {}


def _encode_chunk(args) -> list[bytes]:
    """Worker: JPEG-encode images [start, stop) of a raw split."""
    import simplejpeg
    root, split, count, size, start, stop, quality = args
    key = (root, split)
    if _ENC_STATE.get("key") != key:  # one memmap per worker and split, not per chunk
        _ENC_STATE["key"] = key
        _ENC_STATE["images"] = raw.open_images(Path(root), split, count, (size, size))
    images = _ENC_STATE["images"]
    return [simplejpeg.encode_jpeg(np.ascontiguousarray(images[i])[:, :, None], quality=quality,
                                   colorspace="GRAY", colorsubsampling="Gray")
            for i in range(start, stop)]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append one member; return (data offset, size). USTAR headers are exactly 512 bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o644
    header_at = tf.offset
    tf.addfile(info, io.BytesIO(data))
    return header_at + tarfile.BLOCKSIZE, len(data)


def require() -> None:
    """The DALI shards need only simplejpeg to write (DALI itself is needed to read them)."""
    try:
        import simplejpeg  # noqa: F401
    except ImportError as e:
        raise WriteError(f"--format dali needs simplejpeg: pip install simplejpeg ({e})") from e


def write(root: Path, split_meta: dict, size: int, *, jpeg_quality: int, shard_size: int, workers: int,
          show_progress: bool) -> dict:
    """Webdataset shards of `shard_size` samples + their index files per split of `split_meta`
    ({split: {"count": N}}), JPEG-encoded at `jpeg_quality` by `workers` processes from the raw
    memmaps already under `root`. Returns the manifest's details."""
    (root / "dali").mkdir(exist_ok=True)
    shards: dict[str, list[str]] = {}
    indexes: dict[str, list[str]] = {}
    for split, meta in split_meta.items():
        count = meta["count"]
        labels = np.load(root / split_paths(split)["labels"]).astype("<f4")  # [N, C]
        chunk = 128
        tasks = ((str(root), split, count, size, s, min(s + chunk, count), jpeg_quality)
                 for s in range(0, count, chunk))
        jpegs = (j for res in bounded_imap(_encode_chunk, tasks, workers) for j in res)
        shards[split], indexes[split] = [], []
        bar = progress(count, f"dali {split}", show_progress)
        try:
            for k, start in enumerate(range(0, count, shard_size)):
                stop = min(start + shard_size, count)
                tar_path, idx_path = root / shard_name(split, k), root / index_name(split, k)
                lines = []
                with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
                    for i in range(start, stop):
                        key = _KEY.format(i)
                        parts = []
                        for ext, data in zip(EXTENSIONS, (next(jpegs), labels[i].tobytes(),
                                                          np.array([i], "<i8").tobytes())):
                            off, n = _add(tf, f"{key}.{ext}", data)
                            parts.append(f"{ext} {off} {n} {key}.{ext}")
                        lines.append(" ".join(parts))
                        bar.update(1)
                idx_path.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
                shards[split].append(shard_name(split, k))
                indexes[split].append(index_name(split, k))
        finally:
            bar.close()
            _ENC_STATE.clear()  # in-process mode: drop the memmap before the folder is renamed
    return {
        "shards": shards,
        "index_files": indexes,
        "index_format": f"DALI webdataset index {INDEX_VERSION}",
        "jpeg_quality": jpeg_quality,
        "jpeg": "baseline, 1 channel (GRAY), simplejpeg / libjpeg-turbo",
        "shard_size": shard_size,
        "components": {"jpg": "JPEG uint8 [H, W]", "lbl": "little-endian float32 [C]",
                       "idx": "little-endian int64 position in split"},
        "key_format": "%09d (position in split)",
    }


def read_index(path: Path) -> list[dict[str, tuple[int, int]]]:
    """Parse one index file: per sample {ext: (data offset, size)}."""
    lines = Path(path).read_text().splitlines()
    head = lines[0].split()
    if head[0] != INDEX_VERSION:
        raise ValueError(f"{path}: index version {head[0]!r}, expected {INDEX_VERSION}")
    out = []
    for ln in lines[1:1 + int(head[1])]:
        f = ln.split()
        out.append({f[j]: (int(f[j + 1]), int(f[j + 2])) for j in range(0, len(f), 4)})
    return out
