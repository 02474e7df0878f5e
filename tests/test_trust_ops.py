"""The trust boundary for ops and dtypes: wire names resolve only through torch's op registry, ops
that reach outside tensors are refused, and only plain dtypes are rebuilt from bytes."""

from __future__ import annotations

import json
import re

import _server_fixtures as fx
import pytest
import torch
from _server_fixtures import check_served, raw_connection, read_until_closed

import genie
from genie._errors import LocalProtocolError
from genie.graph import graph_from_bytes
from genie.graph._ops import HARMLESS_STR_ARGS, REFUSED_OPS, overload, refusal, registry, resolve_op
from genie.runtime._remote import RemoteBackend
from genie.transport import DTYPES, Message, Protocol
from genie.transport._protocol import MAGIC, MESSAGES, PREFIX, VERSION

server, remote = fx.server, fx.remote  # fixtures, by name

GETATTR_ESCAPES = [
    "aten.__init__.__getattribute__", "aten.__setattr__.__call__", "aten.add.__class__",
    "aten.__class__.__init__", "prims.__dict__.get", "aten.add.Tensor.__call__", "aten.add",
    "os.system", "builtins.exec.default", "torch.ops.aten.add.Tensor", "genie.__class__",
]



def poisoned_graph(bad_op: str):
    """``view`` that cannot run (it fails on the server), then an op named ``bad_op``: the error
    says which stage refused the graph, decode or run."""
    graph = genie.trace(lambda x: x.view(3, 4) + 1, torch.randn(12))
    view = next(n for n in graph.nodes if n.op == "aten.view.default")
    view.args = (view.args[0], [5, 5])
    next(n for n in graph.nodes if n.op == "aten.add.Tensor").op = bad_op
    return graph


# -- item 1: a table of real OpOverloads -----------------------------------------------------------
def test_registry_is_torch_dispatcher_overloads():
    table = registry()
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.split("::")[0] in ("aten", "prims")}
    assert len(table) == len(names)
    assert resolve_op("aten.add.Tensor") is torch.ops.aten.add.Tensor
    assert resolve_op("aten.relu.default") is torch.ops.aten.relu.default
    assert resolve_op("prims.convert_element_type.default") is torch.ops.prims.convert_element_type.default
    for name in ("aten.add.Tensor", "aten.addmm.default", "prims.iota.default"):
        assert isinstance(overload(table[name]), torch._ops.OpOverload)


@pytest.mark.parametrize("name", GETATTR_ESCAPES)
def test_non_registry_names_are_unsupported(name):
    with pytest.raises(genie.UnsupportedOpError):
        resolve_op(name)


@pytest.mark.parametrize("name", [*GETATTR_ESCAPES[:3], "aten.from_file.default"])
def test_graph_with_a_bad_op_is_refused_when_decoded(name):
    data = poisoned_graph(name).to_bytes()
    with pytest.raises(genie.UnsupportedOpError, match=re.escape(name)):
        graph_from_bytes(data)


def test_graph_over_max_nodes_is_a_protocol_error():
    data = genie.trace(lambda x: (x + 1) * 2, torch.randn(3)).to_bytes()
    assert len(graph_from_bytes(data, max_nodes=10).nodes) == 3
    with pytest.raises(genie.ProtocolError, match="at most 2"):
        graph_from_bytes(data, max_nodes=2)


@pytest.mark.parametrize("name", [*GETATTR_ESCAPES[:3], "aten.from_file.default", "aten._print.default"])
def test_server_refuses_before_anything_runs(server, remote, name):
    # UnsupportedOpError, not the view's RemoteExecutionError: refused before the view ran
    with pytest.raises(genie.UnsupportedOpError, match=re.escape(name)):
        remote.run(poisoned_graph(name), [torch.randn(12)], fetch=[0], keep=[], constants={})
    check_served(remote)  # the same connection lives on
    with fx.using(RemoteBackend(server.address, server.token)) as other:
        check_served(other)


def test_from_file_cannot_read_a_server_file(server, remote, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 16)
    graph = genie.trace(lambda x: x + 1, torch.randn(4))
    node = next(n for n in graph.nodes if n.op == "aten.add.Tensor")
    node.op, node.args = "aten.from_file.default", (str(secret), False, 16)
    node.kwargs = {"dtype": torch.uint8}
    with pytest.raises(genie.UnsupportedOpError, match="from_file"):
        remote.run(graph, [torch.randn(4)], fetch=[0], keep=[], constants={})
    check_served(remote)


# -- item 2: ops that reach outside tensors ----------------------------------------------------------
def _str_or_storage_args(op) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in op._schema.arguments
            if re.search(r"\bstr\b|\bStorage\b", str(a.type))]


def test_every_string_or_storage_overload_is_refused_or_allowlisted():
    """So a future torch cannot add a hole silently: each aten/prims overload of the installed torch
    that takes a string or a storage is refused, or each of its strings is a named harmless enum."""
    seen = 0
    for name, parts in registry().items():
        op = overload(parts)
        args = _str_or_storage_args(op)
        if not args:
            continue
        seen += 1
        why = refusal(op)
        if why is not None:
            with pytest.raises(genie.UnsupportedOpError, match="refused"):
                resolve_op(name)
            continue
        for arg, typ in args:
            assert "Storage" not in typ, name
            assert HARMLESS_STR_ARGS.get(arg), f"{name}: str argument {arg!r} neither refused nor allowlisted"
        assert resolve_op(name) is op
    assert seen > 100  # the enumeration found what it is meant to check


@pytest.mark.parametrize("name", [
    "aten.from_file.default", "aten.from_file.out", "aten._print.default", "aten.set_.source_Storage",
    "aten.set_.source_Storage_storage_offset", "aten.set.source_Storage", "aten.record_stream.default",
    "aten._cufft_set_plan_cache_max_size.default", "aten._test_string_default.default",
])
def test_outside_world_ops_are_refused(name):
    if name not in registry():
        pytest.skip(f"{name} is not in this torch")
    with pytest.raises(genie.UnsupportedOpError, match="refused"):
        resolve_op(name)


def test_refused_ops_table_names_real_ops_with_reasons():
    for name, why in REFUSED_OPS.items():
        assert why
        if name in registry():
            assert refusal(overload(registry()[name])) == why


@pytest.mark.parametrize("name", [
    "aten.gelu.default", "aten.div.Tensor_mode", "aten.einsum.default", "aten.scatter_reduce.two",
    "aten.searchsorted.Tensor", "aten.pad.default", "aten.fft_ihfft.default",
    "aten.linalg_vector_norm.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default", "aten.scaled_dot_product_attention.default",
])
def test_ops_models_use_still_resolve(name):
    assert resolve_op(name) is overload(registry()[name])


def test_gelu_tanh_and_div_modes_run_over_the_wire(remote):
    def fn(x):
        return torch.nn.functional.gelu(x, approximate="tanh") + torch.div(x, 0.3, rounding_mode="floor")

    x = torch.randn(16)
    graph = genie.trace(fn, x)
    (got,) = remote.run(graph, [x], fetch=[0], keep=[], constants=graph.constants).fetched
    torch.testing.assert_close(got, fn(x))


# -- item 3: only plain dtypes on the wire -------------------------------------------------------------
def test_wire_dtypes_are_plain_and_rebuild_from_bytes():
    for name, dt in DTYPES.items():
        assert not name.startswith("q") and "bits" not in name
        t = torch.zeros(3, dtype=dt)
        back = torch.frombuffer(bytearray(t.view(torch.uint8).numpy().tobytes()), dtype=dt)
        assert back.dtype == dt and back.shape == (3,)
    for q in ("quint8", "qint8", "qint32", "quint4x2", "quint2x4", "bits8", "uint4", "int4"):
        assert q not in DTYPES


def _handshake(server) -> tuple:
    p = Protocol("client")
    s = raw_connection(server)
    s.sendall(p.send_bytes(Message("hello", {"version": VERSION, "token": server.token})))
    p.receive_data(s.recv(65536))
    assert p.next_event().kind == "welcome"
    return p, s


@pytest.mark.parametrize("dtype", ["quint8", "qint8", "qint32", "quint4x2", "bits8"])
def test_quantized_buffer_descriptor_closes_only_that_connection(server, remote, dtype):
    check_served(remote)
    p, s = _handshake(server)
    try:
        head = json.dumps({"id": 1, "digests": ["d"], "bufs": [[dtype, [16]]]}).encode()
        s.sendall(PREFIX.pack(MAGIC, VERSION, MESSAGES["upload"].code, len(head), 16) + head + bytes(16))
        p.receive_data(read_until_closed(s))
        err = p.next_event()
        assert err.kind == "error" and err["kind"] == "protocol" and dtype in err["message"]
    finally:
        s.close()
    assert server.proc.poll() is None
    check_served(remote)
    with fx.using(RemoteBackend(server.address, server.token)) as other:
        check_served(other)


@pytest.mark.parametrize("where", ["meta", "arg"])
def test_graph_naming_a_quantized_dtype_is_refused_cleanly(where):
    graph = genie.trace(lambda x: (x + 1).to(torch.float64), torch.randn(4))
    text = graph.to_bytes()
    if where == "meta":  # the output's float64 meta; same length, so the header length holds
        bad = text.replace(b'"float64",0', b'"qint8"  ,0')
    else:
        bad = text.replace(b'{"dt":"float64"}', b'{"dt":"qint32" }')
    assert bad != text
    with pytest.raises(genie.ProtocolError, match="qint"):
        graph_from_bytes(bad)


@pytest.mark.filterwarnings("ignore:.*quantized.*:UserWarning")
def test_quantized_tensor_is_refused_before_it_is_sent():
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    with pytest.raises(LocalProtocolError, match="quint8"):
        Protocol("client").send(Message("hello", {"version": VERSION, "token": ""}, [q]))
