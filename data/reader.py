"""Reading samples by id from the shards of an index, and turning them into batches.

Shards are streamed (`storage.open_read`: local, S3, pipe:) and split into samples by `data.tar`. What we add
to plain WebDataset reading is addressing a sample by its id (the plan needs it for exact resume) and counting,
instead of raising or silently dropping, the samples that cannot be used.
"""
from __future__ import annotations

import io
from collections import Counter
from typing import Iterator

import numpy as np
import simplejpeg
import torch

from data import images, members, storage, tar, writer

COLOURS = ("RGB", "BGR")  # by flip: a BGR row's bytes in reverse order are the mirrored RGB row


def shard_urls(index_url: str, index: dict, template: str = "") -> tuple[list[str], list[str | None]]:
    """URLs of the shards and of their member tables (None for a shard without one): `template` with {name}
    filled in when given, else beside the index."""
    if template:
        if "{name}" not in template:
            raise ValueError(f"shard URL template {template!r} must contain '{{name}}'")

        def url(name: str) -> str:
            return template.format(name=name)
    else:
        base = index_url if not index_url.endswith(".json") else storage.parent(index_url)

        def url(name: str) -> str:
            return storage.join(base, name)
    shards = index["shards"]
    return [url(s["name"]) for s in shards], [url(s["members"]["name"]) if "members" in s else None for s in shards]


def open_index(index_url: str, template: str = "") -> tuple[dict, list[str], list[str | None]]:
    """The index, the shard URLs and their member-table URLs."""
    index = writer.load_index(index_url)
    if not index.get("complete"):
        raise ValueError(f"the shard index at {index_url} is incomplete: the writer was interrupted; rerun it")
    if index["num_samples"] == 0:
        raise ValueError(f"the shard index at {index_url} lists no samples")
    return (index, *shard_urls(index_url, index, template))


def iterate_shard(url: str) -> Iterator[dict]:
    stream = storage.open_read(url)
    try:
        yield from tar.samples(stream)
    finally:
        stream.close()


class ShardReader:
    """Samples by id, read forward through one shard at a time: ids that move forward within a shard cost one
    pass over it; going back or to another shard reopens. A shard with a member table (`data.members`) is
    memory-mapped (local) or read in chunks (S3, pipe:) without parsing its tar headers, any other is read
    through `data.tar`. A missing shard or table is an error (the index and the store disagree); a shard that
    breaks off (truncated, damaged) yields the reason for each sample it still owed."""

    def __init__(self, urls: list[str], starts: np.ndarray, tables: list[str | None] | None = None):
        self.urls, self.starts = urls, starts
        self.tables = tables or [None] * len(urls)
        self._next, self._first, self._end = 0, 0, 0  # the open shard holds ids [_first, _end), _next comes next
        self._stream = self._samples = self._chunks = None
        self._failure = ""

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = self._samples = self._chunks = None

    def _open(self, shard: int) -> None:
        self.close()
        self._first, self._end = int(self.starts[shard]), int(self.starts[shard + 1])
        self._next, self._failure = self._first, ""
        url = self.urls[shard]
        table = members.load(self.tables[shard]) if self.tables[shard] is not None else None
        mapped = storage.map_local(url) if table is not None else None
        if mapped is not None:
            self._chunks = members.Chunks(None, table, memoryview(mapped))
            return
        self._stream = storage.open_read(url)
        if table is not None:
            self._chunks = members.Chunks(self._stream, table)
        else:
            # the samples straight from the stream, without iterate_shard's generator around them: 0.2 us a sample
            self._samples = tar.samples(self._stream)

    def get(self, i: int) -> dict | str:
        """The sample with id `i`, or the reason it cannot be read."""
        if not self._first <= i < self._end or i < self._next:
            self._open(int(np.searchsorted(self.starts, i, side="right")) - 1)
        if self._chunks is not None:
            self._next = i + 1
            return self._chunks.sample(i - self._first)
        while self._samples is not None and self._next <= i:
            try:
                sample = next(self._samples)
            except StopIteration:
                self._samples, self._failure = None, "missing_sample"
                break
            except FileNotFoundError:
                raise
            except Exception:  # truncated or damaged tar: the rest of this shard cannot be read
                self._samples, self._failure = None, "truncated_shard"
                break
            self._next += 1
            if self._next > i:
                return sample
        return self._failure


def decode_image(data: bytes, ext: str, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Member bytes -> (H, W, 3) uint8, mirrored left-right when `flip`; written into `out` (and returned) when
    the image has out's shape, else returned in a new array. JPEG with simplejpeg (libjpeg-turbo), exact settings:
    the fastest decoder we measured (benchmarks/RESULTS.md, "Data"); PNG with Pillow."""
    if ext != "jpg":
        x = images.decode(data)
        x = x[:, ::-1] if flip else x
        if out is None or x.shape != out.shape:
            return np.ascontiguousarray(x)
        out[...] = x
        return out
    try:
        # an image smaller than out fills its start and comes back in its own shape
        x = simplejpeg.decode_jpeg(data, COLOURS[flip], buffer=out)
    except ValueError:
        if out is None:
            raise
        # too large for out, or damaged: decoded alone, the first comes back in its shape, the second raises again
        x = simplejpeg.decode_jpeg(data, COLOURS[flip])
    if flip:
        # one reversed byte copy, which torch vectorizes (about 20 us at 256x256 here, against about 450 us for
        # numpy's x[:, ::-1] copy)
        rows = torch.from_numpy(x.reshape(x.shape[0], -1))
        rows.copy_(rows.flip(1))
    return x


def decode(sample: dict | str, kind: str, flip: bool, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(x, label) of a raw sample; raises images.BadImage with a reason. Images come as (H, W, 3) uint8, written
    into `out` when it has their shape (`decode_image`); latents as (C, h, w) float, where a flipped latent is the
    stored latent of the flipped image, not a flipped latent."""
    if isinstance(sample, str):
        raise images.BadImage(sample)
    if "cls" not in sample:
        raise images.BadImage("no_label")
    try:
        label = int(sample["cls"])
    except ValueError:
        raise images.BadImage("no_label") from None
    try:
        if kind == "latents":
            return np.load(io.BytesIO(sample["latent_flip.npy" if flip else "latent.npy"])), label
        ext = "jpg" if "jpg" in sample else "png" if "png" in sample else None
        if ext is None:
            raise images.BadImage("no_image")
        x = decode_image(sample[ext], ext, flip, out)
    except images.BadImage:
        raise
    except Exception as e:  # decoders raise their own types on damaged bytes
        raise images.BadImage("decode_error", str(e)) from None
    if x.ndim != 3 or x.shape[2] != 3:
        raise images.BadImage("decode_error", f"shape {x.shape}")
    return x, label


def _jpeg_shape(samples: list) -> tuple[int, int, int] | None:
    """(H, W, 3) from the header of the first labelled JPEG among the samples, if any."""
    for sample in samples:
        try:
            if "cls" in sample:
                height, width = simplejpeg.decode_jpeg_header(sample["jpg"])[:2]
                return height, width, 3
        except Exception:  # a string (the reason), a PNG, damaged bytes...: the next sample may do
            pass
    return None


def _images(samples: list, flips: list[bool], failed: dict[int, str]) -> tuple[np.ndarray | None, list[int]]:
    """((B, H, W, 3) uint8 images, mirrored where flipped, or None when none could be read; labels). Unreadable
    positions are left undefined in both and reported in `failed` (position -> reason).

    The batch's size comes from the first JPEG header, so that the usual sample, a labelled JPEG of that size,
    always takes the short path: decoded straight into its slot, or, when flipped, as BGR into the next slot of a
    spare buffer: a BGR row's bytes in reverse order are the mirrored RGB row, and the rows of all flipped images
    are reversed into place by one torch call at the end (per image, the calls cost more than the reversal;
    reversing them in the batch buffer itself, which no longer fits the cache by then, cost 0.7 us more per image
    at 64x64 and 7 at 256x256; decoding into one small buffer and copying mirrored into the slot cost 2-3 us
    more per flipped 64x64 image). Any other sample (PNG, damaged, unlabelled, another size) goes to `decode`,
    which decides; without a JPEG header, the first image decoded gives the size."""
    n = len(samples)
    out = slots = spare = None
    shape = _jpeg_shape(samples)
    labels = [0] * n
    reverse = []  # positions of the images in spare, in order
    decode_jpeg = simplejpeg.decode_jpeg

    def allocate(image_shape):
        nonlocal out, slots, spare, shape
        shape = image_shape
        out = np.empty((n, *shape), np.uint8)
        slots = list(out)
        spare = np.empty_like(out) if any(flips) else None

    if shape is not None:
        allocate(shape)
    for j, (sample, flip) in enumerate(zip(samples, flips)):
        if slots is not None:
            try:
                label = int(sample["cls"])
                if flip:
                    if decode_jpeg(sample["jpg"], "BGR", buffer=spare[len(reverse)]).shape == shape:
                        labels[j] = label
                        reverse.append(j)
                        continue
                elif decode_jpeg(sample["jpg"], "RGB", buffer=slots[j]).shape == shape:
                    labels[j] = label
                    continue
            except Exception:  # a string (the reason), a PNG, damaged bytes...: `decode` tells which
                pass
        try:
            x, labels[j] = decode(sample, "images", flip, slots[j] if slots is not None else None)
        except images.BadImage as e:
            failed[j] = e.reason
            continue
        if out is None:  # no JPEG header: the first good image gives the batch its shape
            allocate(x.shape)
            out[j] = x
        elif x.shape != shape:
            raise ValueError(f"images of sizes {shape} and {x.shape} in one batch: stream shards written at a "
                             f"fixed resolution (these keep the original sizes)")
    if reverse:
        m = len(reverse)
        mirrored = torch.from_numpy(spare[:m]).view(-1, shape[1] * 3).flip(1)
        out.reshape(n, -1)[reverse] = mirrored.view(m, -1).numpy()
    return out, labels


def _latents(samples: list, flips: list[bool], failed: dict[int, str]) -> tuple[list, list[int]]:
    items, labels = [None] * len(samples), [0] * len(samples)
    for j, (sample, flip) in enumerate(zip(samples, flips)):
        try:
            items[j], labels[j] = decode(sample, "latents", flip)
        except images.BadImage as e:
            failed[j] = e.reason
    return items, labels


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to floats in [-1, 1] (k / 127.5 - 1), keeping x's memory format."""
    return x.float().div_(127.5).sub_(1.0)


def make_batch(ids: list[int], samples: list[dict | str], flips: list[bool], kind: str, dtype: str) -> dict:
    """Decode the samples with the given ids, mirrored where `flips` says, into a batch {"x", "label", "index",
    "bad"}: x a tensor, label and index int64 numpy arrays (made tensors on arrival, `workers.arrived`). A
    sample that cannot be used is replaced by a copy of the batch's first good one, so that batch shapes and
    stream positions never shift; `bad` counts the replacements by reason.

    Images are decoded straight into one (B, H, W, 3) buffer, and x is its (B, 3, H, W) view in channels_last
    memory format: converting to a contiguous (B, 3, H, W) array cost 10-25% of the decode time per image.
    `dtype` applies to images (uint8, or float by `to_float`); latents are float32 either way."""
    failed: dict[int, str] = {}
    x, labels = (_images if kind == "images" else _latents)(samples, flips, failed)
    if failed:
        good = next((j for j in range(len(ids)) if j not in failed), None)
        if good is None:
            raise RuntimeError(f"no sample of the batch with ids {list(ids)} could be read: "
                               f"{dict(Counter(failed.values()))}")
        ids = list(ids)
        for j in failed:
            x[j], labels[j], ids[j] = x[good], labels[good], ids[good]
    if kind == "images":
        x = torch.from_numpy(x).permute(0, 3, 1, 2)
        if dtype == "float":
            x = to_float(x)
    else:
        x = torch.from_numpy(np.stack(x)).float()
    return {"x": x, "label": np.array(labels, np.int64), "index": np.array(ids, np.int64),
            "bad": dict(Counter(failed.values()))}
