"""Which tier runs a replayed program, and when it moves up.

A program is a template filled with one vector of ints (``genie.compile``'s replays, device mode's
repeated flushes): its key is (template digest, ints), so one client's program never runs code made
for another program. Per key:

- **tier 0**, the interpreter, runs the first execution and checks every op's output against its
  declared meta, noting the nodes whose outputs it had to lay out again;
- **tier 1**, generated code (``_codegen.Program``), is built at the second execution (a one-off
  program never pays for it) and runs from then on;
- **tier 2**, Inductor (``_inductor``), is compiled in a child process after ``COMPILE_AFTER`` runs
  (for a program that takes ``COMPILE_MIN_MS`` or more at tier 1: below, a compiled call's fixed
  cost and the source checks outweigh what it saves),
  never on the event loop, one compile at a time per worker, within ``COMPILE_SECONDS`` and
  ``COMPILE_MEMORY``. Its first run is a differential check: tier 1 runs on copies of everything the
  program can write, tier 2 on the real values, and outputs and written values must agree within
  ``TOLERANCE`` for their dtype. Agreement promotes the program; disagreement keeps tier 1's
  results, demotes it for good, and deletes the package. One tier-2 run in ``SPOT_EVERY`` is checked
  again. A compile or check that fails never fails a run, and is counted in ``genie.stats()``.

Staged runs (streamed inputs, early outputs) stay on the interpreter, which owns stage boundaries.

Call tree::

    Tiers(mode, cache_dir, device, stats, pool)        one per worker
      .run(key, RunValues(graph, inputs, constants, residents, private, on_node))   in a worker thread
        tier 0: Interpreter(... conformed=set()) -> Program.build
        tier 1: Program.run
        tier 2: _checked (first run, spot checks) or Compiled.run; None (a source laid out
                otherwise than compiled for) -> tier 1
      ._start_compile(state, graph, metas)             a thread waiting on the compile child
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import ChainMap, Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genie._errors import GenieError
from genie.graph import CONST, RESIDENT, Graph, Node
from genie.server._codegen import Program
from genie.server._guards import Guards, guard_tables
from genie.server._inductor import (
    Compiled,
    CompileError,
    Signature,
    artefact_path,
    compile_in_child,
    signature,
)
from genie.server._interpreter import Interpreter

MODES = ("off", "codegen", "inductor")
COMPILE_AFTER = 3  # runs of a program before it is compiled: one-off programs never are
COMPILE_MIN_MS = 1.0  # a program faster than this at tier 1 stays there: a compiled call's fixed cost
SPOT_EVERY = 64  # one tier-2 run in this many is checked against tier 1 again
MAX_PROGRAMS = 256  # programs whose tiers a worker remembers (least recently run go first)
COMPILE_SECONDS = 900.0
COMPILE_MEMORY = 8 << 30
# (rtol, atol) per dtype between tiers 1 and 2: Inductor fuses and reorders float arithmetic (and
# may accumulate half precision in float32), integers and booleans must be equal
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9), torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 1e-2),
}
Key = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class RunValues:
    """What one run binds: its graph, inputs, constants (private copies included), residents."""

    graph: Graph
    inputs: Sequence[torch.Tensor]
    constants: Mapping[str, torch.Tensor]
    residents: Mapping[int, torch.Tensor]
    private: Collection[str]
    on_node: Callable[[Node], None] | None


def mark_program(graph: Graph, digest: str, ints: bytes) -> None:
    """``graph`` is template ``digest`` filled with ``ints`` (resident handles left out: the program
    binds its residents at each run): a program whose runs may tier up."""
    graph.__dict__["_program_key"] = (digest, ints)


def program_key(graph: Graph) -> Key | None:
    return graph.__dict__.get("_program_key")


def best_mode() -> str:
    """The highest tier this machine supports: Inductor needs a C++ compiler on CPU."""
    try:
        import torch._inductor  # noqa: F401
    except Exception:  # pragma: no cover (a torch without Inductor)
        return "codegen"
    compiler = torch.cuda.is_available() or shutil.which("g++") or shutil.which("c++")
    return "inductor" if compiler else "codegen"


@dataclass
class ProgramTiers:
    """One program's state across its runs."""

    key: Key
    runs: int = 0
    tier: int = 0
    program: Program | None = None
    conformed: set[int] | None = None  # nodes whose outputs tier 0 laid out again
    compiled: Compiled | None = None  # loaded, and trusted once ``checked``
    checked: bool = False
    compiling: bool = False
    compile_seconds: float | None = None
    failure: str = ""  # why tier 2 is out of reach for it
    tier2_runs: int = 0
    last_ms: float = 0.0  # its last run's time, at the tier it ran at
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wants_compile(self, min_ms: float) -> bool:
        """Whether its next tier-1 run starts (or waits its turn for) a compile."""
        return (self.compiled is None and not self.failure and not self.compiling and self.tier == 1
                and self.runs >= COMPILE_AFTER and self.last_ms >= min_ms)

    def report(self, min_ms: float | None) -> dict:
        """``min_ms``: the compile threshold (None: this server does not compile)."""
        seconds = None if self.compile_seconds is None else round(self.compile_seconds, 3)
        return {"template": self.key[0][:16], "runs": self.runs, "tier": self.tier,
                "last_ms": round(self.last_ms, 3), "compile_seconds": seconds, "compiling": self.compiling,
                "waiting": min_ms is not None and self.wants_compile(min_ms), "failure": self.failure}


class Tiers:
    def __init__(self, mode: str, cache_dir: Path, device: torch.device, stats: Counter,
                 reserve: Callable[[int], object] | None = None, min_ms: float = COMPILE_MIN_MS) -> None:
        """``reserve(n)``: a context that holds ``n`` bytes under the memory limit (the differential
        check's copies), raising GenieError when they do not fit; ``min_ms``: programs faster than
        this at tier 1 are not compiled."""
        self.min_ms = min_ms
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.cache_dir = cache_dir
        self.device = device
        self.stats = stats
        self.reserve = reserve
        self.programs: OrderedDict[Key, ProgramTiers] = OrderedDict()
        self._lock = threading.Lock()
        self._compiling = False

    def report(self) -> list[dict]:
        with self._lock:
            min_ms = self.min_ms if self.mode == "inductor" else None
            return [p.report(min_ms) for p in self.programs.values()]

    def _state(self, key: Key) -> ProgramTiers:
        with self._lock:
            state = self.programs.get(key)
            if state is None:
                state = self.programs[key] = ProgramTiers(key)
                while len(self.programs) > MAX_PROGRAMS:
                    self.programs.popitem(last=False)
            else:
                self.programs.move_to_end(key)
            return state

    def run(self, key: Key, run: RunValues) -> list[torch.Tensor]:
        """Run at the program's tier. Its state changes under its lock (a check runs under it too,
        as it may demote); plain runs of one program from several connections run at once."""
        state = self._state(key)
        t0 = time.perf_counter()
        try:
            return self._run(state, run)
        finally:
            state.last_ms = (time.perf_counter() - t0) * 1e3

    def _run(self, state: ProgramTiers, run: RunValues) -> list[torch.Tensor]:
        with state.lock:
            state.runs += 1
            if state.program is None and state.conformed is not None and not state.failure:
                self._build(state, run.graph)  # its second run: it is not a one-off
            if state.compiled is not None and (not state.checked
                                               or state.tier2_runs % SPOT_EVERY == SPOT_EVERY - 1):
                out = self._tier2(state, run, checked=True)
                if out is not None:
                    return out
            program, trusted = state.program, state.compiled if state.checked else None
        if program is None:
            return self._interpret(state, run)
        if trusted is not None:
            out = self._tier2(state, run, checked=False, compiled=trusted)
            if out is not None:
                return out
        out = self._tier1(program, run)
        with state.lock:
            if self.mode == "inductor" and state.wants_compile(self.min_ms):
                self._consider_compile(state, run, out)
        return out

    # -- the tiers ----------------------------------------------------------------------------------
    def _interpret(self, state: ProgramTiers, run: RunValues) -> list[torch.Tensor]:
        """Tier 0, noting which nodes' outputs it laid out again (tier 1 checks those)."""
        interp = Interpreter(run.graph, device=self.device, constants=run.constants, residents=run.residents,
                             on_node=run.on_node, private=run.private)
        interp.conformed = set()
        try:
            values = interp.run(run.inputs)
            conformed = interp.conformed
        finally:
            vars(interp).clear()  # a reference cycle (see run_graph)
        self.stats["runs_tier0"] += 1
        if self.mode != "off":
            with state.lock:
                state.conformed = state.conformed if state.conformed is not None else conformed
        return values

    def _build(self, state: ProgramTiers, graph: Graph) -> None:
        assert state.conformed is not None
        state.program = Program.build(graph, self.device, state.conformed)
        if state.program is None:
            state.failure = "stays on the interpreter (complex values)"
        else:
            state.tier = 1
            self.stats["tier1_programs"] += 1

    def _guards(self, graph: Graph) -> Guards:
        return Guards(guard_tables(graph), self.device)

    def _tier1(self, program: Program, run: RunValues) -> list[torch.Tensor]:
        out = program.run(run.graph, run.inputs, constants=run.constants, residents=run.residents,
                                guards=self._guards(run.graph), private=run.private, on_node=run.on_node)
        self.stats["runs_tier1"] += 1
        return out

    def _tier2(self, state: ProgramTiers, run: RunValues, *, checked: bool,
               compiled: Compiled | None = None) -> list[torch.Tensor] | None:
        if run.on_node is not None:  # compiled code runs whole: a cancellation is seen before it
            run.on_node(run.graph.nodes[0])
        if checked:
            out = self._checked(state, run)
            if state.compiled is None:  # demoted: tier 1's results
                return out
        else:
            assert compiled is not None
            out = compiled.run(run.graph, run.inputs, constants=run.constants, residents=run.residents,
                               device=self.device)
        if out is not None:
            with self._lock:
                state.tier2_runs += 1
                self.stats["runs_tier2"] += 1
        return out

    def _checked(self, state: ProgramTiers, run: RunValues) -> list[torch.Tensor] | None:
        """Tier 2 on the real values, tier 1 on copies of what the program can write: the same
        results promote (or keep) tier 2; others demote it, and tier 1's results stand."""
        assert state.compiled is not None and state.program is not None
        graph, constants, residents, private = run.graph, run.constants, run.residents, run.private
        res_nodes = {n.args[0] for n in graph.nodes if n.op == RESIDENT}
        priv = {n.args[0] for n in graph.nodes if n.op == CONST and n.args[0] in private}
        extra = sum(residents[h].untyped_storage().nbytes() for h in res_nodes)
        extra += sum(constants[d].untyped_storage().nbytes() for d in priv)
        try:
            hold = self.reserve(extra) if self.reserve is not None else None
            if hold is not None:
                hold.__enter__()
        except GenieError:
            self.stats["tier2_checks_skipped"] += 1  # no room for the copies now: tier 1 runs it
            return None
        try:
            res_copy = {h: residents[h].clone() for h in res_nodes}
            const_copy = {d: constants[d].clone() for d in priv}
            want = state.program.run(graph, [t.clone() for t in run.inputs],
                                     constants=ChainMap(const_copy, constants),  # type: ignore[arg-type]
                                     residents=ChainMap(res_copy, residents),  # type: ignore[arg-type]
                                     guards=self._guards(graph), private=private, on_node=run.on_node)
            got = state.compiled.run(graph, run.inputs, constants=constants, residents=residents,
                                     device=self.device)
            if got is None:  # not bound: the real values are untouched, tier 1 runs them
                return None
            self.stats["tier2_checks"] += 1
            pairs = [*zip(got, want, strict=True), *((residents[h], res_copy[h]) for h in res_nodes),
                     *((constants[d], const_copy[d]) for d in priv)]
            bad = next((i for i, (g, w) in enumerate(pairs) if not close(g, w)), None)
            if bad is None:
                state.checked, state.tier = True, 2
                return got
            for mine, theirs in pairs[len(got):]:  # tier 1's results stand
                mine.copy_(theirs)
            self._demote(state, f"tier 2 disagreed with tier 1 (value {bad} of the check)")
            self.stats["tier2_rejected"] += 1
            self.stats["runs_tier1"] += 1
            return want
        finally:
            if hold is not None:
                hold.__exit__(None, None, None)

    def _demote(self, state: ProgramTiers, why: str) -> None:
        state.compiled, state.checked, state.tier, state.failure = None, False, 1, why
        artefact_path(self.cache_dir, state.key, self.device).unlink(missing_ok=True)

    # -- compiling -----------------------------------------------------------------------------------
    def _consider_compile(self, state: ProgramTiers, run: RunValues, out: Sequence) -> None:
        graph = run.graph
        tables = guard_tables(graph)
        sig = ("draws random numbers or allocates unwritten memory" if tables.random or tables.fresh
               else signature(graph, run.inputs, run.constants, run.residents, out))
        if isinstance(sig, str):  # random draws and fresh memory need the interpreter's guards
            state.failure = sig
            self.stats["tier2_ineligible"] += 1
            return
        path = artefact_path(self.cache_dir, state.key, self.device)
        if path.exists():  # compiled before, by this server or an earlier one
            try:
                state.compiled = Compiled.load(path)
                state.compile_seconds = 0.0
                self.stats["tier2_loaded"] += 1
                return
            except CompileError:
                pass
        with self._lock:
            if self._compiling:
                return  # one compile at a time: a later run asks again
            self._compiling = state.compiling = True
        threading.Thread(target=self._compile, args=(state, graph, sig, path), daemon=True,
                         name="genie-compile").start()

    def _compile(self, state: ProgramTiers, graph: Graph, sig: Signature, path: Path) -> None:
        t0 = time.perf_counter()
        try:
            compile_in_child(graph, sig, path, self.device, timeout=COMPILE_SECONDS, memory=COMPILE_MEMORY)
            compiled = Compiled.load(path)
        except CompileError as e:
            state.failure = str(e)
            self.stats["tier2_compile_failures"] += 1
            return
        finally:
            state.compile_seconds = time.perf_counter() - t0
            with self._lock:
                self._compiling = state.compiling = False
        self.stats["tier2_compiles"] += 1
        state.compiled = compiled  # its first run checks it


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether tier 2's ``got`` stands for tier 1's ``want``: the same dtype and shape, and, per
    tensor, ``max|got - want| <= rtol * max|want| + atol`` with ``TOLERANCE``'s pair for the dtype
    (relative to the tensor's scale, not each element's: a fused reduction moves every element by
    rounding, near zero too); nan and inf in the same places; integers and booleans equal."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype not in TOLERANCE:
        return torch.equal(got, want)
    odd = ~torch.isfinite(want)  # nan and inf: in the same places, the same kind
    if not torch.equal(odd, ~torch.isfinite(got)) or not torch.equal(got[odd].nan_to_num(0.0),
                                                                      want[odd].nan_to_num(0.0)):
        return False
    finite = ~odd
    if not finite.any():
        return True
    g, w = got[finite].double(), want[finite].double()
    rtol, atol = TOLERANCE[want.dtype]
    return bool((g - w).abs().max() <= rtol * w.abs().max() + atol)


__all__ = ["COMPILE_AFTER", "MODES", "SPOT_EVERY", "TOLERANCE", "RunValues", "Tiers", "best_mode", "close",
           "mark_program", "program_key"]
