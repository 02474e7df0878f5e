"""Triton kernels for Genie's fused ops, each with a torch reference. Imports nothing else from genie,
and nothing from triton until a kernel first runs on the Triton path.

This folder is only ever ``genie.kernels``. With the repo root on sys.path (``python -c`` or ``-m``
from a checkout) it also looks like a top-level ``kernels``, a name that belongs to the installed
``kernels`` distribution that transformers imports; imported under that name, it hands the name to
that distribution and runs none of Genie's code.
"""

import sys

if __name__ != "genie.kernels":

    def _hand_over(name: str, init_file: str) -> None:
        import importlib.machinery
        import importlib.util
        from pathlib import Path

        ours = Path(init_file).resolve().parent.parent
        path = [p for p in sys.path if Path(p or ".").resolve() != ours]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            del sys.modules[name]
            raise ModuleNotFoundError(f"No module named {name!r} (the folder {ours / name} is Genie's "
                                      "kernels, importable only as genie.kernels)", name=name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns what sys.modules holds
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise

    _hand_over(__name__, __file__)
else:
    from ._attention import attention, attention_reference
    from ._conv import conv2d_bn_act, conv2d_bn_act_reference, fold_batchnorm
    from ._decode import decode_attention, decode_attention_reference
    from ._ops import FUSED_OPS, FusedOp

__all__ = [
    "FUSED_OPS",
    "FusedOp",
    "attention",
    "attention_reference",
    "conv2d_bn_act",
    "conv2d_bn_act_reference",
    "decode_attention",
    "decode_attention_reference",
    "fold_batchnorm",
]
