"""Semantic analysis and scheduling: pure, synchronous functions from a Graph to meaning and a plan.

Imports only genie.graph, genie._errors and torch: never capture, runtime or server code.
"""

from genie.semantic._analyzer import SemanticAnalyzer, WorkloadProfile, analyze
from genie.semantic._cost import GraphCost, NodeCost, graph_cost
from genie.semantic._fuse import FusedCall, fuse
from genie.semantic._match import Pat
from genie.semantic._patterns import BUILTIN_RULES, Match, MatchContext, PatternRegistry, Rule
from genie.semantic._phase import Phase
from genie.semantic._plan import ExecutionPlan, FusionGroup, Residency, Stage, Transfer
from genie.semantic._scheduler import FUSIONS, Scheduler, run_scheduler, schedule
from genie.semantic._workload import WorkloadType

__all__ = [
    "BUILTIN_RULES", "FUSIONS", "ExecutionPlan", "FusedCall", "FusionGroup", "GraphCost", "Match",
    "MatchContext", "NodeCost", "Pat", "PatternRegistry", "Phase", "Residency", "Rule", "Scheduler",
    "SemanticAnalyzer", "Stage", "Transfer", "WorkloadProfile", "WorkloadType", "analyze", "fuse",
    "graph_cost", "run_scheduler", "schedule",
]
