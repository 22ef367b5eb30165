"""Reading a transformers checkpoint tensor by tensor, and writing one as a stream of tensors.

The streaming export (:mod:`~peft_loraprune.export.streaming`) must never hold the model: it reads each base tensor
from the checkpoint's safetensors shards when it needs it, and writes each exported tensor to its shard as soon as
it is computed.

* :class:`CheckpointReader` opens the shard that holds a tensor for that read only (``safetensors.safe_open``), so
  the pages of the memory-mapped shard are released after each tensor instead of accumulating in the process's
  resident memory; it reads row ranges through ``get_slice``, so a large embedding is copied in pieces.
* :class:`StreamingShardWriter` writes the safetensors format itself, because ``safetensors.torch.save_file`` takes
  a whole dict of tensors (a shard's worth in memory). The format is a little-endian u64 header length, a JSON
  header giving each tensor's dtype, shape and byte range, then the raw bytes in that order: with every shape and
  dtype known before the first byte (the export plans them), the header is written first and the data streamed
  after it. Files written this way load with ``safetensors`` and ``from_pretrained`` like any other; the index
  file is transformers' ``model.safetensors.index.json``.

Nothing is written to the output folder under its final name until it is complete: each shard is written to a
temporary name and renamed when its last byte is in (a killed export leaves no half-written shard that looks
whole).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from safetensors import safe_open

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype codes (the format's own names)
_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

#: rows copied at a time for a tensor that passes through unchanged (about this many bytes per piece)
COPY_PIECE_BYTES = 64 * 1024 * 1024


class CheckpointReader:
    """The tensors of a local transformers checkpoint folder (``model.safetensors`` or sharded with
    ``model.safetensors.index.json``), read one at a time."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(folder, SAFE_WEIGHTS_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), SAFE_WEIGHTS_NAME)
        else:
            raise FileNotFoundError(
                f"{folder} holds no safetensors checkpoint ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME})"
            )
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for shard in sorted(set(self.weight_map.values())):
            with safe_open(os.path.join(folder, shard), framework="pt") as f:
                for key in f.keys():
                    if self.weight_map.get(key) == shard:
                        piece = f.get_slice(key)
                        self._info[key] = (_CODE_DTYPES[piece.get_dtype()], tuple(piece.get_shape()))

    def keys(self) -> list[str]:
        """Tensor names in the order the shards hold them (shard by shard)."""
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def dtype(self, key: str) -> torch.dtype:
        return self._info[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor (the shard is mapped for this read only)."""
        with safe_open(os.path.join(self.folder, self.weight_map[key]), framework="pt") as f:
            return f.get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of a tensor."""
        with safe_open(os.path.join(self.folder, self.weight_map[key]), framework="pt") as f:
            return f.get_slice(key)[start:stop]

    def pieces(self, key: str, piece_bytes: int = COPY_PIECE_BYTES) -> Iterator[torch.Tensor]:
        """The tensor in consecutive row ranges of about ``piece_bytes`` each (whole if it has no rows)."""
        dtype, shape = self._info[key]
        if len(shape) < 1 or shape[0] == 0:
            yield self.get(key)
            return
        row_bytes = max(1, math.prod(shape[1:]) * dtype.itemsize)
        step = max(1, piece_bytes // row_bytes)
        for start in range(0, shape[0], step):
            yield self.rows(key, start, min(shape[0], start + step))


class PlannedTensor(NamedTuple):
    """A tensor the writer will receive: its name, dtype and shape, known before any data is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_plan(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Tensors split, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard alone)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"tensor {t.name!r}: dtype {t.dtype} cannot be written to safetensors here")
        entries[t.name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(header)) + header


class StreamingShardWriter:
    """Writes planned tensors to safetensors shards in ``folder`` as their data arrives, in plan order.

    Use :meth:`write` for each planned tensor's data, in one or more pieces split along the first dimension, then
    :meth:`close`, which writes the index (for more than one shard) and returns the files written."""

    def __init__(self, folder: str, tensors: list[PlannedTensor], max_shard_bytes: int) -> None:
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("a planned tensor name appears twice")
        self.folder = folder
        self.shards = shard_plan(tensors, max_shard_bytes)
        n = len(self.shards)
        self.files = [SAFE_WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(shard_index, t) for shard_index, shard in enumerate(self.shards) for t in shard]
        self._position = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._handle = None
        self._open_shard = -1

    def _tmp(self, index: int) -> str:
        return os.path.join(self.folder, f".{self.files[index]}.partial")

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            os.replace(self._tmp(self._open_shard), os.path.join(self.folder, self.files[self._open_shard]))
            self._handle = None

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append ``data`` (the whole tensor, or its next rows) to the tensor ``name``, which must be the one the
        plan expects next; its dtype must be the planned one."""
        if self._position >= len(self._queue):
            raise ValueError(f"tensor {name!r} was not planned (every planned tensor is already written)")
        shard_index, planned = self._queue[self._position]
        if name != planned.name:
            raise ValueError(f"expected the data of {planned.name!r} next, got {name!r}")
        if data.dtype != planned.dtype:
            raise TypeError(f"tensor {name!r}: planned {planned.dtype}, got {data.dtype}")
        if shard_index != self._open_shard:
            self._finish_shard()
            self._open_shard = shard_index
            self._handle = open(self._tmp(shard_index), "wb")
            self._handle.write(_header(self.shards[shard_index], {"format": "pt"}))
        raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + raw.nbytes > planned.nbytes:
            raise ValueError(f"tensor {name!r}: more data than its planned shape {planned.shape}")
        self._handle.write(memoryview(raw))
        self._written += raw.nbytes
        if self._written == planned.nbytes:
            self._position += 1
            self._written = 0

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the file names written."""
        if self._position != len(self._queue):
            missing = [t.name for _, t in self._queue[self._position :]]
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]!r}")
        self._finish_shard()
        if len(self.files) > 1:
            weight_map = {t.name: self.files[i] for i, shard in enumerate(self.shards) for t in shard}
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": weight_map,
            }
            with open(os.path.join(self.folder, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
            return [*self.files, SAFE_WEIGHTS_INDEX_NAME]
        return list(self.files)

    def abort(self) -> None:
        """Close and delete the shard being written (after an error)."""
        if self._handle is not None:
            self._handle.close()
            os.remove(self._tmp(self._open_shard))
            self._handle = None


def parse_size(value) -> int:
    """``"2GB"``, ``"500MB"``, ``"1GiB"`` or a number of bytes, as bytes (transformers' ``max_shard_size`` forms)."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    if text.isdigit():
        return int(text)
    raise ValueError(f"max_shard_size must be a number of bytes or a size such as '2GB' or '500MB', got {value!r}")


def planned(name: str, dtype: torch.dtype, shape: Iterable[int]) -> PlannedTensor:
    return PlannedTensor(name, dtype, tuple(int(s) for s in shape))
