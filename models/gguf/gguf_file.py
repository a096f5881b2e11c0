"""A lean, memory-mapped GGUF reader: metadata, tensor infos, and lazy (sliced) tensor loads.

gguf-py's GGUFReader parses every array element into its own numpy object (4.6 s for the
102400-token DeepSeek vocabulary); this reader parses numeric arrays in one ``frombuffer``
and maps tensor data without reading it, so a rank touches only the bytes of its shard.
Every error names the file and, where there is one, the tensor or key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
       6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
_DEQUANT_CHUNK_ELEMS = 1 << 24  # bound fp32 temporaries while dequantizing
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux >= 5.14: map file pages now, read-only (no copy-on-write)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


class GGUFError(ValueError):
    """A GGUF file that cannot be read or does not hold what the model needs."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order: fastest-varying first
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch order (slowest-varying first)."""
        return tuple(reversed(self.ne))

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.ne, dtype=np.int64))
        return n // block * size


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated file (header ends at byte {len(self.buf)})")
        self.pos += n
        return start

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        return bytes(self.buf[self.take(n) : self.pos]).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        buf, pos, unpack, out = self.buf, self.pos, struct.Struct("<Q").unpack_from, []
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += 8 + n
                out.append(buf[pos - n : pos].decode("utf-8", "replace"))
        except struct.error:
            pos = len(buf) + 1
        if pos > len(buf):
            raise GGUFError(f"{self.path}: truncated file (in a string array)")
        self.pos = pos
        return out

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar(4), self.scalar(10)
            if etype in _NP:
                dt = np.dtype(_NP[etype]).newbyteorder("<")
                start = self.take(count * dt.itemsize)
                return np.frombuffer(self.buf, dt, count, start).tolist()
            if etype == _STRING:  # hot path: 100k tokens and merges
                return self.strings(count)
            return [self.value(etype, key) for _ in range(count)]
        raise GGUFError(f"{self.path}: metadata key '{key}' has unknown value type {vtype}")


class GGUFFile:
    """Opens ``path`` read-only and memory-maps it; nothing is read until a tensor is loaded."""

    def __init__(self, path: str | os.PathLike[str], use_mmap: bool = True) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise GGUFError(f"{self.path}: no such file") from None
        except (ValueError, OSError) as e:  # empty files cannot be mapped
            raise GGUFError(f"{self.path}: cannot map file ({e}); not a GGUF file") from None
        self.use_mmap = use_mmap
        cur = _Cursor(self._buf, self.path)
        magic = bytes(self._buf[cur.take(4) : cur.pos])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = cur.scalar(4)
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2, 3)")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar(4), key)
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = tuple(cur.scalar(10) for _ in range(cur.scalar(4)))
            infos.append((name, ne, cur.scalar(4), cur.scalar(10)))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, tid, off in infos:
            try:
                qtype = GGMLQuantizationType(tid)
            except ValueError:
                raise GGUFError(
                    f"{self.path}: tensor '{name}' has unknown ggml type id {tid}"
                ) from None
            info = TensorInfo(name, ne, qtype, data_start + off)
            if info.offset + info.nbytes > len(self._buf):
                raise GGUFError(
                    f"{self.path}: tensor '{name}' ends at byte {info.offset + info.nbytes} but "
                    f"the file has {len(self._buf)} bytes (truncated file)"
                )
            self.tensors[name] = info

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: missing tensor '{name}'") from None

    def check_shape(self, name: str, expected: tuple[int, ...]) -> TensorInfo:
        info = self.info(name)
        if info.shape != tuple(expected):
            raise GGUFError(
                f"{self.path}: tensor '{name}' has shape {list(info.shape)} but the metadata "
                f"implies {list(expected)}"
            )
        return info

    def load(
        self,
        name: str,
        dtype: torch.dtype,
        *,
        dim: int = 0,
        start: int | None = None,
        stop: int | None = None,
        expect: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` in ``dtype`` (PyTorch order), optionally only ``[start:stop]`` of
        dimension ``dim``. Only the bytes of that slice are read (and dequantized)."""
        info = self.check_shape(name, expect) if expect is not None else self.info(name)
        shape = info.shape
        dim = dim % len(shape)
        lo, hi = start or 0, shape[dim] if stop is None else stop
        if not 0 <= lo < hi <= shape[dim]:
            raise GGUFError(f"{self.path}: slice [{lo}:{hi}] out of range for '{name}' {shape}")
        raw = self._raw(info)
        block = GGML_QUANT_SIZES[info.qtype][0]
        if dim == len(shape) - 1 and (lo, hi) != (0, shape[dim]):
            if lo % block or hi % block:  # the slice cuts blocks: dequantize whole rows
                full = self._convert(info, raw, shape, dtype)
                return full[..., lo:hi].contiguous()
            per = raw.shape[-1] // (shape[-1] // block)  # bytes (or items) per block
            raw = raw[..., lo // block * per : hi // block * per]
        elif (lo, hi) != (0, shape[dim]):
            raw = raw[(slice(None),) * dim + (slice(lo, hi),)]
        out_shape = list(shape)
        out_shape[dim] = hi - lo
        return self._convert(info, raw, tuple(out_shape), dtype)

    def block_size(self, name: str) -> int:
        """Elements per block of tensor ``name`` (1 for float types)."""
        return GGML_QUANT_SIZES[self.info(name).qtype][0]

    def blocks(self, info: TensorInfo) -> torch.Tensor:
        """A block-quantized tensor's bytes as uint8 ``[..., rows, row_bytes]``: mapped from
        the file, not read."""
        if info.qtype in _FLOAT_TYPES:
            raise GGUFError(f"{self.path}: tensor '{info.name}' is {info.qtype.name}, not blocks")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self._raw(info))

    def populate(self, t: torch.Tensor) -> None:
        """Map the file pages under tensor ``t`` (a view of this file) into the page tables
        now, reading them from disk if needed: a weight used in place would otherwise take
        one page fault per 4 KiB on its first use (seconds for a 10 GB model, paid by the first
        request). Only this rank's slices are touched. A kernel without the call: no-op."""
        if _LIBC is None or t.numel() == 0:
            return
        extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1
        page = mmap.PAGESIZE
        start = t.data_ptr() // page * page
        end = t.data_ptr() + extent * t.element_size()
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_READ)

    def release(self, info: TensorInfo) -> None:
        """Drop this tensor's file pages from the mapping (re-read from the file if touched
        again: the mapping is private and never written), so copied weights are not counted
        twice in RSS."""
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        page = mmap.PAGESIZE
        start = (addr + info.offset + page - 1) // page * page
        end = (addr + info.offset + info.nbytes) // page * page
        if end > start and _LIBC is not None:
            _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)

    def _raw(self, info: TensorInfo) -> np.ndarray:
        shape = info.shape
        if info.qtype in _FLOAT_TYPES:
            dt = np.dtype(_FLOAT_TYPES[info.qtype])
            return np.frombuffer(self._buf, dt, int(np.prod(shape)), info.offset).reshape(shape)
        block, size = GGML_QUANT_SIZES[info.qtype]
        if shape[-1] % block:
            raise GGUFError(f"{self.path}: tensor '{info.name}' row length is not a block multiple")
        row_bytes = shape[-1] // block * size
        arr = np.frombuffer(self._buf, np.uint8, info.nbytes, info.offset)
        return arr.reshape(shape[:-1] + (row_bytes,))

    def _convert(
        self, info: TensorInfo, raw: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        q = info.qtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mmap views are fine here
            if q in _FLOAT_TYPES:
                t = torch.from_numpy(raw)
                out = t.to(dtype) if t.dtype != dtype else t
            elif q == GGMLQuantizationType.BF16:
                t = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
                out = t.to(dtype) if dtype != torch.bfloat16 else t
            else:
                out = self._dequantize(info, raw, shape, dtype)
        out = out if out.is_contiguous() else out.contiguous()
        if not self.use_mmap and out.data_ptr() == torch.from_numpy(raw).data_ptr():
            out = out.clone()  # use_mmap: false reads the tensor into memory
        return out.reshape(shape)

    def _dequantize(
        self, info: TensorInfo, raw: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        try:
            size = GGML_QUANT_SIZES[info.qtype][1]
            gguf_quants.dequantize(np.ascontiguousarray(raw.reshape(-1)[:size]), info.qtype)
        except (NotImplementedError, KeyError):
            raise GGUFError(
                f"{self.path}: tensor '{info.name}' has type {info.qtype.name}, which cannot "
                "be dequantized (supported: F32, F16, BF16 and the types gguf.quants knows)"
            ) from None
        rows = raw.reshape(-1, raw.shape[-1])
        out = torch.empty(rows.shape[0], shape[-1], dtype=dtype)
        step = max(1, _DEQUANT_CHUNK_ELEMS // max(1, shape[-1]))
        for i in range(0, rows.shape[0], step):
            part = gguf_quants.dequantize(np.ascontiguousarray(rows[i : i + step]), info.qtype)
            out[i : i + step] = torch.from_numpy(part)
        return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the key/value metadata of a GGUF file (fast, even for a 100k-token vocabulary)."""
    return GGUFFile(path).metadata
