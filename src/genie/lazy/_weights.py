"""``genie.remote_state_dict``: a checkpoint in the server's weights store, bound by name.

Each tensor becomes a remote constant named by the content digest the server computed for it: a
``LazyTensor`` whose bytes this process never holds (its host side is a meta tensor). Programs that
read it send the digest alone, and the server loads the tensor from its store when a run first
needs it. Meant for the standard big-model pattern::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(genie.remote_state_dict("llama/model.safetensors"), assign=True)
    genie.init_meta_buffers(model)  # what checkpoints leave out: a rotary embedding's inv_freq

``init_meta_buffers`` gives the buffers still on the meta device (non-persistent ones, which no
checkpoint holds) their values: computed on the host by the module's own initializer (a
transformers model's ``_init_weights``, for modules that own no parameters), then sent to the device.
"""

from __future__ import annotations

import torch

from genie.lazy._device import DEVICE_TYPE
from genie.lazy._lazy import LazyTensor, current_recorder, wrap
from genie.runtime import backend


def remote_state_dict(name: str, device: str | torch.device = f"{DEVICE_TYPE}:0") -> dict[str, torch.Tensor]:
    """``{tensor name: remote tensor}`` for checkpoint ``name`` (a ``.safetensors`` file, or a sharded
    checkpoint's ``.safetensors.index.json``, relative to the server's ``--weights`` directory).
    No weight bytes move. Raises WeightsError when the server refuses the name."""
    device = torch.device(device)
    if device.type != DEVICE_TYPE:
        raise ValueError(f"remote_state_dict binds weights on a {DEVICE_TYPE} device, not {device}")
    index_of = getattr(backend(), "weights_index", None)
    if index_of is None:
        raise NotImplementedError("genie.remote_state_dict needs a genie server with a weights store; "
                                  "the in-process backend (GENIE_SERVER=inprocess) has none")
    rec = current_recorder()
    out: dict[str, torch.Tensor] = {}
    for tensor_name, dtype, shape, digest in index_of(name):
        with rec.lock:
            node = rec.const_node(torch.empty(shape, dtype=dtype, device="meta"), digest)
            t: LazyTensor = wrap(rec, node, 0, node.outputs[0], device)
        out[tensor_name] = t
    return out


def init_meta_buffers(model: torch.nn.Module, device: str | torch.device = f"{DEVICE_TYPE}:0") -> list[str]:
    """Compute the buffers ``model`` still holds on the meta device and move them to ``device``;
    returns their names. ValueError naming a buffer Genie cannot compute (its module has no
    initializer, or owns parameters an initializer would overwrite)."""
    init = getattr(model, "_init_weights", None)
    done = []
    for path, module in model.named_modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not metas:
            continue
        where = f"{path}.{metas[0]}" if path else metas[0]
        if init is None or next(module.parameters(recurse=False), None) is not None:
            raise ValueError(f"buffer {where!r} is still on the meta device (no checkpoint holds it) and "
                             "Genie cannot compute it: set it yourself before running the model")
        for n in metas:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        init(module)
        for n in metas:
            module._buffers[n] = module._buffers[n].to(device)
        done += [f"{path}.{n}" if path else n for n in metas]
    return done
