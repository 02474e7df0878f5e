"""Genie: a remote GPU that looks like a local PyTorch device."""

from genie._errors import (
    AuthenticationError,
    CleartextTokenError,
    ConnectionLostError,
    GenieError,
    LocalProtocolError,
    ProtocolError,
    RemoteExecutionError,
    RemoteMemoryError,
    RemoteProtocolError,
    UnsupportedOpError,
    WeightsError,
)
from genie._profile import profile
from genie._setup import setup as _setup
from genie._setup import stats
from genie.graph import Graph
from genie.lazy import (
    LazyTensor,
    call,
    capture,
    compile,
    execute,
    fetch,
    get_graph,
    init_meta_buffers,
    remote_state_dict,
    trace,
)
from genie.runtime import connect
from genie.semantic import (
    ExecutionPlan,
    PatternRegistry,
    Scheduler,
    SemanticAnalyzer,
    WorkloadProfile,
    WorkloadType,
    analyze,
    schedule,
)

_setup()

__all__ = [
    "AuthenticationError", "CleartextTokenError", "ConnectionLostError", "GenieError", "Graph", "LazyTensor",
    "LocalProtocolError", "ProtocolError", "RemoteExecutionError", "RemoteMemoryError",
    "RemoteProtocolError", "UnsupportedOpError", "WeightsError", "call", "capture", "compile", "connect",
    "execute", "fetch", "get_graph", "init_meta_buffers", "remote_state_dict", "stats", "trace",
    "ExecutionPlan", "PatternRegistry", "Scheduler", "SemanticAnalyzer", "WorkloadProfile", "WorkloadType",
    "analyze", "profile", "schedule",
]
