"""The read-only weights store (``genie serve --weights DIR``): ``.safetensors`` files the server
reads itself, so a client binds a model's weights by name and never uploads, or even holds, them.

Each file's tensors are known by name, dtype, shape and Genie content digest (the digest a client
computes for the same bytes, so a locally built weight that the store holds is never uploaded).
Building that index reads the whole file once; it is kept in a sidecar beside the file
(``NAME.genie-index.json``, with the file's size and mtime, rebuilt when they change; ``genie
weights index DIR`` builds them all ahead of time) or, for a store the server may not write, in
memory. Tensors are read with the ``safetensors`` library (memory-mapped) only when a run needs
them, checked against their digest, and then live in the constant pool like any constant.

The store trusts nothing it is asked: a name is a relative path inside DIR to a regular
``.safetensors`` file or a sharded checkpoint's ``.safetensors.index.json``; ``..``, absolute paths,
symlinks that leave DIR, device files and anything else are refused with an error that repeats the
given name, never the server's paths. A file's own header is checked before anything is read
through it (dtypes, shapes, offsets inside the file, sizes that add up), so a lying file is an
error for that request, never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from genie._errors import WeightsError

SUFFIX = ".safetensors"
SHARDED = ".safetensors.index.json"
SIDECAR = ".genie-index.json"
INDEX_VERSION = 1
MAX_HEADER = 100 << 20  # safetensors' own bound on a header
MAX_NAME = 1024
CHUNK = 16 << 20
# safetensors' dtype names -> torch (the plain ones the wire carries)
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
       if hasattr(torch, "float8_e4m3fn") else {}),
}


@dataclass(frozen=True, slots=True)
class StoredTensor:
    file: str  # path relative to the store's root
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int
    digest: str

    def to_wire(self) -> list:
        return [self.name, str(self.dtype).removeprefix("torch."), list(self.shape), self.digest]


class WeightStore:
    """The files under ``root``, indexed on first use (thread-safe: runs load in worker threads)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise WeightsError(f"--weights {root}: not a directory")
        self._files: dict[str, list[StoredTensor]] = {}
        self._by_digest: dict[str, StoredTensor] = {}
        self._lock = threading.Lock()
        self.bytes_loaded = 0
        self.tensors_loaded = 0

    # -- names -----------------------------------------------------------------------------------------
    def resolve(self, name: str, *, suffixes: tuple[str, ...] = (SUFFIX, SHARDED)) -> Path:
        """The file ``name`` names inside the store; WeightsError (naming ``name`` only) otherwise."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name:
            raise WeightsError(f"weights name {name!r:.80}: not a relative file name")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or name.startswith(("/", "\\")):
            raise WeightsError(f"weights name {name!r}: only paths inside the server's weights store")
        if not name.endswith(suffixes):
            raise WeightsError(f"weights name {name!r}: not a {' or '.join(suffixes)} file")
        path = self.root / rel
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise WeightsError(f"weights name {name!r}: no such file in the server's weights store") from None
        if real != self.root and self.root not in real.parents:
            raise WeightsError(f"weights name {name!r}: it leads outside the server's weights store")
        try:
            if not stat.S_ISREG(real.stat().st_mode):
                raise WeightsError(f"weights name {name!r}: not a regular file")
        except OSError:
            raise WeightsError(f"weights name {name!r}: not readable") from None
        return real

    def tensors(self, name: str) -> list[StoredTensor]:
        """Every tensor of checkpoint ``name`` (a file, or a sharded index and all its shards)."""
        path = self.resolve(name)
        if name.endswith(SHARDED):
            out: list[StoredTensor] = []
            for shard, names in self._shards(name, path).items():
                have = {t.name: t for t in self._index(shard)}
                missing = names - have.keys()
                if missing:
                    raise WeightsError(f"weights {name!r}: shard {shard!r} lacks {sorted(missing)[0]!r}")
                out += [have[n] for n in sorted(names)]
            return out
        return list(self._index(name))

    def _shards(self, name: str, path: Path) -> dict[str, set[str]]:
        try:
            index = json.loads(path.read_bytes()[:MAX_HEADER])
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise WeightsError(f"weights {name!r}: not a sharded checkpoint index (no weight_map)") from None
        base = str(Path(name).parent)
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(tensor, str) or not isinstance(shard, str):
                raise WeightsError(f"weights {name!r}: its weight_map must map names to file names")
            rel = shard if base in ("", ".") else f"{base}/{shard}"
            self.resolve(rel, suffixes=(SUFFIX,))
            shards.setdefault(rel, set()).add(tensor)
        return shards

    # -- the index -------------------------------------------------------------------------------------
    def index_all(self) -> int:
        """Index every ``.safetensors`` file in the store (``genie weights index``); returns how many
        tensors it holds. Files that are not valid checkpoints are skipped, and said so on stderr."""
        import sys

        n = 0
        for path in sorted(self.root.rglob(f"*{SUFFIX}")):
            rel = path.relative_to(self.root).as_posix()
            try:
                n += len(self._index(rel))
            except WeightsError as e:
                print(f"genie weights: skipped {rel}: {e}", file=sys.stderr)
        return n

    def known(self, digest: str) -> bool:
        return digest in self._by_digest

    def _index(self, rel: str) -> list[StoredTensor]:
        with self._lock:
            hit = self._files.get(rel)
        if hit is not None:
            return hit
        path = self.resolve(rel, suffixes=(SUFFIX,))
        st = path.stat()
        entries = _read_sidecar(rel, path, st) or _build_index(rel, path, st)
        with self._lock:
            self._files[rel] = entries
            for t in entries:
                self._by_digest.setdefault(t.digest, t)
        return entries

    # -- reading ---------------------------------------------------------------------------------------
    def load(self, digest: str) -> torch.Tensor | None:
        """The CPU tensor the store holds under ``digest`` (its bytes checked), or None."""
        t = self._by_digest.get(digest)
        if t is None:
            return None
        from safetensors import safe_open

        path = self.resolve(t.file, suffixes=(SUFFIX,))
        try:
            with safe_open(str(path), framework="pt") as f:
                value = f.get_tensor(t.name)
        except Exception as e:  # the library's own errors: a file that changed or lies
            raise WeightsError(f"weights file {t.file!r}: cannot read {t.name!r}: {e}") from None
        if value.dtype != t.dtype or tuple(value.shape) != t.shape or _digest(value) != digest:
            raise WeightsError(f"weights file {t.file!r} changed since it was indexed ({t.name!r} no longer "
                             "has its digest); run `genie weights index` on the store again")
        with self._lock:
            self.bytes_loaded += t.nbytes
            self.tensors_loaded += 1
        return value


def _digest(t: torch.Tensor) -> str:
    from genie.graph import content_digest

    return content_digest(t)


Entry = tuple[str, torch.dtype, tuple[int, ...], int, int]  # name, dtype, shape, start, nbytes


def parse_header(data: bytes, file_size: int, where: str) -> list[Entry]:
    """(name, dtype, shape, start, nbytes) of each tensor in a safetensors header, every field
    checked against the file: WeightsError naming ``where`` if anything lies."""
    if len(data) < 8:
        raise WeightsError(f"weights file {where!r}: too short to be a safetensors file")
    hlen = int.from_bytes(data[:8], "little")
    if hlen > MAX_HEADER or 8 + hlen > file_size:
        raise WeightsError(f"weights file {where!r}: its header length ({hlen}) is not in the file")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except (ValueError, RecursionError):
        raise WeightsError(f"weights file {where!r}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise WeightsError(f"weights file {where!r}: its header is not a JSON object")
    base, size = 8 + hlen, file_size - 8 - hlen
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            ok = (all(type(s) is int and 0 <= s < 1 << 48 for s in shape) and len(shape) <= 64
                  and type(begin) is int and type(end) is int and 0 <= begin <= end <= size)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or math.prod(shape) * dtype.itemsize != end - begin:
            raise WeightsError(f"weights file {where!r}: tensor {name!r:.80} has a malformed entry "
                             "(dtype, shape or offsets)")
        out.append((name, dtype, shape, base + begin, end - begin))
    return out


def _build_index(rel: str, path: Path, st: os.stat_result) -> list[StoredTensor]:
    with open(path, "rb") as f:
        head = f.read(8)
        hlen = int.from_bytes(head, "little") if len(head) == 8 else 0
        if hlen > MAX_HEADER:
            raise WeightsError(f"weights file {rel!r}: its header length ({hlen}) is not in the file")
        parsed = parse_header(head + f.read(hlen), st.st_size, rel)
        entries = []
        for name, dtype, shape, start, nbytes in parsed:
            h = hashlib.blake2b(digest_size=16)  # as genie.graph.content_digest hashes a tensor
            h.update(f"{dtype}{shape}".encode())
            f.seek(start)
            left = nbytes
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise WeightsError(f"weights file {rel!r}: ends inside tensor {name!r}")
                h.update(chunk)
                left -= len(chunk)
            entries.append(StoredTensor(rel, name, dtype, shape, start, nbytes, h.hexdigest()))
    _write_sidecar(path, st, entries)
    return entries


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


def _write_sidecar(path: Path, st: os.stat_result, entries: list[StoredTensor]) -> None:
    doc = {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "tensors": [[t.name, str(t.dtype).removeprefix("torch."), list(t.shape), t.start, t.nbytes,
                        t.digest] for t in entries]}
    tmp = _sidecar(path).with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(doc))
        tmp.replace(_sidecar(path))
    except OSError:  # a read-only store: the index lives in memory only
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read_sidecar(rel: str, path: Path, st: os.stat_result) -> list[StoredTensor] | None:
    side = _sidecar(path)
    try:
        doc = json.loads(side.read_text())
        if doc["version"] != INDEX_VERSION or doc["size"] != st.st_size or doc["mtime_ns"] != st.st_mtime_ns:
            return None
        by_name = {str(d).removeprefix("torch."): d for d in DTYPES.values()}
        out = []
        for name, dtype, shape, start, nbytes, digest in doc["tensors"]:
            dt = by_name[dtype]
            if math.prod(shape) * dt.itemsize != nbytes or start + nbytes > st.st_size:
                return None
            out.append(StoredTensor(rel, str(name), dt, tuple(shape), int(start), int(nbytes), str(digest)))
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None
