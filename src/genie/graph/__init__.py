"""Node/Graph IR, its wire form and templates, its digest and its torch.fx view."""

from genie.graph._alias import (
    UNDECLARED_ALIASES,
    UNDECLARED_WRITES,
    undeclared_writes,
    written_source_nodes,
    written_sources,
)
from genie.graph._digest import content_digest
from genie.graph._ir import CONST, INPUT, RESIDENT, SOURCE_OPS, Graph, Node, Ref, TensorMeta, map_refs
from genie.graph._ops import (
    check_enum_args,
    check_vetted,
    enum_args,
    op_name,
    overload,
    registry,
    resolve_op,
    vetted_reason,
    vetted_refusal,
)
from genie.graph._stages import StageSchedule
from genie.graph._template import (
    SMALL_FIX,
    Split,
    Template,
    apply,
    corrections,
    fix_lists,
    predict,
    small_corrections,
    split,
    with_split,
)
from genie.graph._vetted import VETTED
from genie.graph._wire import (
    NodeWriter,
    decode_meta,
    encode_meta,
    graph_from_bytes,
    graph_to_bytes,
    outputs_tail,
)

__all__ = [
    "CONST", "INPUT", "RESIDENT", "SMALL_FIX", "SOURCE_OPS", "UNDECLARED_ALIASES", "UNDECLARED_WRITES",
    "VETTED", "Graph", "Node", "NodeWriter", "Ref", "Split", "StageSchedule", "Template", "TensorMeta",
    "apply", "check_enum_args", "check_vetted", "content_digest", "corrections", "decode_meta",
    "encode_meta", "enum_args", "fix_lists", "graph_from_bytes", "graph_to_bytes", "map_refs", "op_name",
    "outputs_tail",
    "overload", "predict", "registry", "resolve_op", "small_corrections", "split", "undeclared_writes",
    "vetted_reason", "vetted_refusal", "with_split", "written_source_nodes", "written_sources",
]
