"""Tier 2: a graph compiled ahead of time by Inductor (``torch.export`` then AOTInductor), in a child
process, into a package on disk that the worker loads and calls as one function.

Why a child process and AOTInductor: compiling holds the GIL for seconds (tracing, lowering) and
would stall the worker's event loop and its other runs; the package it leaves is a shared library
that loads in milliseconds and runs with no Python per op. The package persists, named by the
program's key, so a restarted server tiers up at once.

The compiled function takes the graph's sources (inputs, constants, residents, in node order) and
returns its outputs; in-place writes to sources (a static KV cache) land in the tensors passed in.
It assumes the metas it was compiled for and checks none itself, so ``Compiled.run`` checks every
source's dtype, shape and strides exactly, that the sources are still apart in memory and bound
as when compiled, and lays outputs out as the graph declares. Inductor's
indirect indexing keeps its bounds asserts (``assert_indirect_indexing``): an index past its tensor
raises, as the interpreter's index checks do.

Call tree::

    artefact_path(cache_dir, key)             where the package for a program key lives
    compile_in_child(graph, path, timeout=, memory=)   python -c _inductor.main: build_module, export,
                                                       aoti_compile_and_package -> path
    Compiled.load(path, graph)                the loaded package
    Compiled.run(graph, inputs, constants=, residents=)
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from genie._errors import GenieError, RemoteExecutionError
from genie.graph import (
    CONST,
    INPUT,
    SOURCE_OPS,
    Graph,
    Ref,
    TensorMeta,
    decode_meta,
    encode_meta,
    graph_from_bytes,
    graph_to_bytes,
    map_refs,
    resolve_op,
)
from genie.server._interpreter import own_storage
from genie.server._memory import meta_extent

FORMAT = 1  # bumped when what goes into a package changes: older packages are never loaded


class CompileError(GenieError):
    """Tier 2 could not compile or load a program (the template stays on tier 1; nobody's fault)."""


def artefact_path(cache_dir: Path, key: tuple[str, bytes], device: torch.device) -> Path:
    """The package for program ``key`` (template digest, its ints) on ``device``'s type, built by
    this torch: a name nobody but this server's compiles writes."""
    h = hashlib.blake2b(digest_size=20)
    for part in (str(FORMAT), torch.__version__, device.type, key[0]):
        h.update(part.encode() + b"\0")
    h.update(key[1])
    return cache_dir / f"{h.hexdigest()}.pt2"


def sources(graph: Graph) -> list[int]:
    """Node ids of the graph's distinct sources, the compiled function's arguments in order: a
    constant or resident that several nodes bind is one argument (two would be two buffers to
    Inductor, and a write through one would not show in the other). Per graph, not per structure:
    which nodes name the same value is the digests' and handles' doing (equal-valued buffers)."""
    return _slots(graph)[0]


def _slots(graph: Graph) -> tuple[list[int], tuple[int, ...]]:
    """(the first node of each distinct source, each source node's argument position)."""
    known = graph.__dict__.get("_compiled_slots")
    if known is None:
        first: dict[tuple, int] = {}
        slot: dict[int, int] = {}
        for n in graph.nodes:
            if n.op in SOURCE_OPS:
                slot[n.id] = first.setdefault((n.op, n.args[0]), len(first))
        firsts = [next(i for i, p in slot.items() if p == k) for k in range(len(first))]
        known = graph.__dict__["_compiled_slots"] = (firsts, tuple(slot.values()))
    return known


def build_module(graph: Graph, device: torch.device, views: Collection[int],
                 slots: Sequence[int]) -> fx.GraphModule:
    """``graph`` as a GraphModule over its sources (placeholders: ``slots`` gives each source node's),
    fused ops as their torch references (Inductor makes its own kernels of them); outputs in
    ``views`` (views of a source) are not returned."""
    from genie.kernels import FUSED_OPS

    references = {name: f.reference for name, f in FUSED_OPS.items()}
    fg = fx.Graph()
    values: dict[tuple[int, int], fx.Node] = {}
    placeholders = [fg.placeholder(f"source_{k}") for k in range(max(slots, default=-1) + 1)]
    for n, k in zip((n for n in graph.nodes if n.op in SOURCE_OPS), slots, strict=True):
        values[(n.id, 0)] = placeholders[k]
    look = lambda r: values[(r.node, r.index)]  # noqa: E731
    for n in graph.nodes:
        if n.op in SOURCE_OPS:
            continue
        kwargs = {k: map_refs(v, look) for k, v in n.kwargs.items() if k != "pin_memory"}
        if isinstance(kwargs.get("device"), torch.device):
            kwargs["device"] = device
        args = tuple(device if type(a) is torch.device else map_refs(a, look) for a in n.args)
        fn = resolve_op(n.op, references if n.op.startswith("genie.") else None)
        out = fg.call_function(fn, args, kwargs)
        if n.multi:
            for i in range(len(n.outputs)):
                values[(n.id, i)] = fg.call_function(_getitem, (out, i))
        else:
            values[(n.id, 0)] = out
    fg.output(tuple(values[(r.node, r.index)] for i, r in enumerate(graph.outputs) if i not in views))
    return fx.GraphModule(torch.nn.Module(), fg)


def _getitem(seq: Sequence, i: int):  # an fx target: operator.getitem, named for tracebacks
    return seq[i]


@dataclass(frozen=True)
class Signature:
    """What a package was compiled for: each source's meta, and the outputs that are views of a
    source (output position -> source position, shape, strides, offset), which the package does
    not return: they are made again, as views of the sources it wrote in place."""

    metas: list[TensorMeta]
    views: dict[int, tuple[int, list[int], list[int], int]]
    slots: tuple[int, ...]  # each source node's argument position (``_slots``)

    def to_json(self) -> str:
        return json.dumps({"metas": [encode_meta(m) for m in self.metas],
                           "views": sorted(self.views.items()), "slots": list(self.slots)})

    @classmethod
    def from_json(cls, text: str) -> Signature:
        d = json.loads(text)
        return cls([decode_meta(m) for m in d["metas"]], {int(i): tuple(v) for i, v in d["views"]},
                    tuple(int(k) for k in d["slots"]))


def signature(graph: Graph, inputs: Sequence[torch.Tensor], constants: Mapping[str, torch.Tensor],
              residents: Mapping[int, torch.Tensor], outputs: Sequence) -> Signature | str:
    """The signature to compile this run's program for, or why it must not be compiled: a source
    that is a view with an offset, or two sources in one memory (Inductor takes its arguments to be
    apart); two outputs in one memory (each would come back as a copy, and a later write through
    one would not show in the other). An output in a source's memory is made again as that view."""
    metas: list[TensorMeta] = []
    views: dict[int, tuple[int, list[int], list[int], int]] = {}
    by_storage: dict[int, tuple[int, torch.Tensor]] = {}
    for k, nid in enumerate(sources(graph)):
        n = graph.nodes[nid]
        t = (own_storage(inputs[n.args[0]]) if n.op == INPUT else constants[n.args[0]] if n.op == CONST
             else residents[n.args[0]])
        if t.storage_offset():
            return "a source is a view with an offset"
        ptr = t.untyped_storage().data_ptr()
        if n.op != INPUT:  # (inputs are bound each in memory of its own)
            if ptr in by_storage:
                return "two sources share memory"
            by_storage[ptr] = (k, t)
        metas.append(TensorMeta.of(t))
    taken: dict[int, Ref] = {}
    for i, (r, v) in enumerate(zip(graph.outputs, outputs, strict=True)):
        if not isinstance(v, torch.Tensor):
            return "an output is not a tensor"
        ptr = v.untyped_storage().data_ptr()
        if ptr in by_storage:
            k, t = by_storage[ptr]
            views[i] = (k, list(v.shape), list(v.stride()), v.storage_offset())
        elif taken.setdefault(ptr, r) != r:
            return "two outputs share memory"
    return Signature(metas, views, _slots(graph)[1])


def examples(metas: Sequence[TensorMeta], device: torch.device) -> list[torch.Tensor]:
    """Zeros laid out as each source was seen (static shapes: the values do not matter)."""
    return [torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=device).zero_() for m in metas]


def compile_in_child(graph: Graph, sig: Signature, path: Path, device: torch.device, *,
                     timeout: float, memory: int) -> None:
    """Compile ``graph`` for ``sig`` into the package ``path`` (and the signature beside it) in a
    child process: its own session, killed whole past ``timeout`` seconds, its data segment capped
    at ``memory`` bytes. CompileError on failure."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        job = Path(tmp) / "graph.bin"
        job.write_bytes(graph_to_bytes(graph))
        (Path(tmp) / "signature.json").write_text(sig.to_json())
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "TORCHINDUCTOR_CACHE_DIR": str(path.parent / "inductor")}
        code = "from genie.server._inductor import main; main()"
        out = Path(tmp) / "package.pt2"
        argv = [sys.executable, "-c", code, str(job), str(out), str(device), str(memory), str(os.getpid())]
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CompileError(f"compiling took longer than {timeout:.0f} s") from None
        if proc.returncode != 0 or not out.exists():
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise CompileError(f"the compiler exited with {proc.returncode}: {tail[0][:300]}")
        os.replace(Path(tmp) / "signature.json", _signature_path(path))
        os.replace(out, path)  # whole or absent: a package is never seen half-written


def _signature_path(path: Path) -> Path:
    return path.with_suffix(".json")


def main() -> None:
    """The child: argv = graph bytes' path, the package's path, the device, its memory cap, the
    worker's pid. It dies with the worker (a compile nobody waits for any more is not finished)."""
    job, out, device, memory = sys.argv[1], sys.argv[2], torch.device(sys.argv[3]), int(sys.argv[4])
    _die_with_parent(int(sys.argv[5]))
    os.nice(19)  # the lowest CPU priority (gcc inherits it): the clients' runs come first
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))  # itself: no preexec_fn in a threaded parent
    torch.set_num_threads(1)
    graph = graph_from_bytes(Path(job).read_bytes())
    sig = Signature.from_json((Path(job).parent / "signature.json").read_text())
    module = build_module(graph, device, sig.views, sig.slots)
    exported = torch.export.export(module, tuple(examples(sig.metas, device)), strict=False)
    torch._inductor.aoti_compile_and_package(exported, package_path=out)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when its parent thread ends
    if os.getppid() != parent:  # it ended before that took effect
        os._exit(1)


class Compiled:
    """A loaded package, and the signature it was compiled for."""

    def __init__(self, runner, sig: Signature) -> None:
        self.runner = runner
        self.sig = sig

    @classmethod
    def load(cls, path: Path) -> Compiled:
        try:
            sig = Signature.from_json(_signature_path(path).read_text())
            runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # damaged, or from another build: compiled again
            path.unlink(missing_ok=True)
            raise CompileError(f"could not load {path.name}: {type(e).__name__}: {e}") from e
        return cls(runner, sig)

    def run(self, graph: Graph, inputs: Sequence[torch.Tensor], *, constants: Mapping[str, torch.Tensor],
            residents: Mapping[int, torch.Tensor], device: torch.device) -> list[torch.Tensor] | None:
        """The outputs, or None where a source is not laid out as compiled for (a lower tier runs it:
        the client's declared strides of a source are not binding, so this is nobody's fault)."""
        graph.check_inputs(inputs)
        if _slots(graph)[1] != self.sig.slots:  # other nodes name one value than when compiled
            return None
        args = []
        storages = set()
        for nid, m in zip(sources(graph), self.sig.metas, strict=True):
            n = graph.nodes[nid]
            if n.op == INPUT:
                t = own_storage(inputs[n.args[0]].to(device))
            elif n.op == CONST:
                t = constants[n.args[0]]
            else:
                t = residents[n.args[0]]
            if (t.dtype != m.dtype or t.shape != m.shape or t.stride() != m.stride or t.storage_offset()
                    or t.device != device):
                return None
            if n.op != INPUT:  # two values in one memory: compiled as apart, so tier 1 runs them
                ptr = t.untyped_storage().data_ptr()
                if ptr in storages:
                    return None
                storages.add(ptr)
            args.append(t)
        try:
            made = iter(self.runner(*args))
        except Exception as e:  # an index out of bounds, in Inductor's own assert
            raise RemoteExecutionError(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                                       op="genie.compiled") from e
        views = self.sig.views
        return [_view(args, views[i]) if i in views else _laid_out(next(made), graph.meta(r))
                for i, r in enumerate(graph.outputs)]


def _view(args: Sequence[torch.Tensor], view: tuple[int, list[int], list[int], int]) -> torch.Tensor:
    k, shape, stride, offset = view
    return args[k].as_strided(shape, stride, offset)


def _laid_out(t: torch.Tensor, m: TensorMeta) -> torch.Tensor:
    """An output in the layout the client declared for it (Inductor picks its own)."""
    if t.dtype != m.dtype or tuple(t.shape) != m.shape:
        raise RemoteExecutionError(f"the compiled program made {TensorMeta.of(t)} where the graph declares "
                                   f"{m} (a genie bug)", op="genie.compiled")
    if t.stride() == m.stride and t.storage_offset() == m.offset:
        return t
    flat = torch.empty(meta_extent(m) // t.element_size(), dtype=t.dtype, device=t.device)
    return flat.as_strided(m.shape, m.stride, m.offset).copy_(t)


__all__ = ["CompileError", "Compiled", "Signature", "artefact_path", "build_module", "compile_in_child",
           "signature"]
