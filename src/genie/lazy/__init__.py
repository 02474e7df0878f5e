"""The capture layer: LazyTensor, dispatch, factory interception and the capture API.

(Named `lazy` so that `genie.capture`, the context manager, does not shadow it.)
"""

from genie.lazy._api import capture, get_graph, install_module_hooks, trace
from genie.lazy._async import call, execute, fetch
from genie.lazy._compile import compile
from genie.lazy._device import DEVICE_TYPE, register
from genie.lazy._lazy import LazyTensor, materialize
from genie.lazy._meta import SHAPES
from genie.lazy._weights import init_meta_buffers, remote_state_dict

__all__ = ["DEVICE_TYPE", "SHAPES", "LazyTensor", "call", "capture", "compile", "execute", "fetch",
           "get_graph", "init_meta_buffers", "install_module_hooks", "materialize", "register",
           "remote_state_dict", "trace"]
