"""Node/Graph IR, its wire form, its digest and its torch.fx view."""

from genie.graph._alias import UNDECLARED_ALIASES, undeclared_writes, written_source_nodes, written_sources
from genie.graph._digest import content_digest
from genie.graph._ir import CONST, INPUT, RESIDENT, SOURCE_OPS, Graph, Node, Ref, TensorMeta, map_refs
from genie.graph._ops import resolve_op
from genie.graph._stages import StageSchedule

__all__ = ["CONST", "INPUT", "RESIDENT", "SOURCE_OPS", "UNDECLARED_ALIASES", "Graph", "Node", "Ref",
           "content_digest",
           "StageSchedule", "TensorMeta", "map_refs", "resolve_op", "undeclared_writes",
           "written_source_nodes", "written_sources"]
