"""``genie <command>``: the command line. Each subcommand is one entry in ``COMMANDS``.

    genie serve --host 127.0.0.1 --port 7070 --device cuda:0 --token SECRET --memory-limit 20GiB
    genie serve --host 0.0.0.0 --token SECRET --tls-cert cert.pem --tls-key key.pem
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence

from genie.transport import LIMITS

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"1.5GiB"``, ``"20GB"`` or ``"1000000"`` as bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M, 20GiB or a byte count)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return v


def parse_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive count: {text!r}")
    return int(text)


_LIMIT_TYPES: dict[str, Callable[[str], int | float]] = {"bytes": parse_size, "count": parse_count,
                                                         "seconds": parse_seconds}


COMPILE_MODES = ("off", "codegen", "inductor")  # genie.server.MODES, without importing the server here
MAX_BATCH = 32  # genie.server's default batch size, without importing the server here
BATCH_LIMIT = 1024  # --max-batch at most: each size a program batches at is traced and compiled


def _batch_size(text: str) -> int:
    n = parse_count(text)
    if n > BATCH_LIMIT:
        raise argparse.ArgumentTypeError(f"--max-batch is at most {BATCH_LIMIT}, not {n}")
    return n


def _batch_wait(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.0 <= v <= 1.0:  # (nan fails both)
        raise argparse.ArgumentTypeError(f"--batch-wait must be between 0 and 1 second, not {text!r}")
    return v


# -- serve ----------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7070, help="TCP port; 0 picks a free one and prints it")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if there is one)")
    p.add_argument("--token", default=None,
                   help="clients must present this token: one tenant (default: $GENIE_TOKEN unless "
                        "--tokens is given; none: no check, and then only a loopback --host is allowed)")
    p.add_argument("--tokens", default=None, metavar="FILE",
                   help="one 'tenant:token' per line: each tenant's programs run in a worker process "
                        "of its own; re-read on SIGHUP")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token (any client who can reach it)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve over TLS only")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    for name, lim in LIMITS.items():  # one flag per limit that has one: the table is in transport
        if lim.flag is not None:
            default = "none" if lim.default is None else lim.default
            p.add_argument(lim.flag, dest=name, type=_LIMIT_TYPES[lim.unit], default=None,
                           help=f"{lim.help} (default {default})")
    p.add_argument("--ops", choices=("vetted", "all"), default="vetted",
                   help="vetted (default): only the ops real models use, with their index arguments checked; "
                        "all: every aten/prims op of this torch, for trusted clients only (a hostile one can "
                        "crash or read other clients' memory)")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="a read-only store of .safetensors files that clients bind by name "
                        "(genie.remote_state_dict) and that answers their uploads by digest")
    p.add_argument("--peers", default="", metavar="H:P,H:P",
                   help="the genie servers this one may pull values from (x.to('remote_accelerator:j')); "
                        "a client can never make it connect anywhere else (default: none)")
    p.add_argument("--compile", choices=COMPILE_MODES, default=os.environ.get("GENIE_COMPILE"),
                   help="the highest tier a replayed program runs at: the interpreter only, generated code, "
                   "or Inductor (default: $GENIE_COMPILE, else inductor where a C++ compiler or a GPU is "
                   "here, else codegen)")
    p.add_argument("--compile-cache", default=os.environ.get("GENIE_COMPILE_CACHE"), metavar="DIR",
                   help="where compiled programs persist, so a restarted server tiers up at once "
                   "(default: $GENIE_COMPILE_CACHE, else $XDG_CACHE_HOME/genie/compile)")
    p.add_argument("--max-batch", type=_batch_size, default=MAX_BATCH, metavar="N",
                   help="runs of one replayed program (from any of a tenant's connections) that run as one "
                   f"batch, at most; 1: no batching (default {MAX_BATCH})")
    p.add_argument("--batch-wait", type=_batch_wait, default=0.0, metavar="SECONDS",
                   help="how long a batch waits for more runs before it starts (default 0: it runs what is "
                   "ready)")
    p.add_argument("--verbose", action="store_true", help="log connections, protocol errors and batch sizes")
    p.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)


def _serve(args: argparse.Namespace) -> int:
    from genie._setup import SERVING

    os.environ[SERVING] = "1"  # this process and its children (workers, compiles) are nobody's clients
    from genie.server import Config, ConfigError, parse_peers, run_server
    from genie.transport import Limits

    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        print(f"genie serve: --device must be cpu or cuda:N, not {args.device!r}", file=sys.stderr)
        return 2
    if args.compile is not None and args.compile not in COMPILE_MODES:  # from $GENIE_COMPILE
        print(f"genie serve: GENIE_COMPILE must be one of {', '.join(COMPILE_MODES)}, not {args.compile!r}",
              file=sys.stderr)
        return 2
    limits = Limits().replace(**{k: getattr(args, k) for k in LIMITS if hasattr(args, k)})
    if args.ops == "all":
        print("genie serve: WARNING: --ops all: every aten/prims op runs, unvetted; a client can crash this "
              "server or read other clients' memory with one. Serve trusted clients only", file=sys.stderr,
              flush=True)
    try:
        peers = parse_peers(args.peers)
    except ValueError as e:
        print(f"genie serve: {e}", file=sys.stderr)
        return 2
    try:
        token = args.token if args.token is not None or args.tokens else os.environ.get("GENIE_TOKEN")
        run_server(Config(host=args.host, port=args.port, device=args.device, token=token, limits=limits,
                          exit_on_stdin_eof=args.exit_on_stdin_eof, verbose=args.verbose,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure,
                          tokens_file=args.tokens, ops=args.ops, weights=args.weights, peers=peers,
                          compile=args.compile, compile_cache=args.compile_cache,
                          max_batch=args.max_batch, batch_wait=args.batch_wait))
    except ConfigError as e:
        print(f"genie serve: {e}", file=sys.stderr)
        return 2
    return 0


# -- pool -----------------------------------------------------------------------------------------------
def _pool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", type=parse_count, required=True, help="how many genie servers (devices)")
    p.add_argument("--gpus-per-server", type=float, default=None,
                   help="GPUs each server reserves (default: 1 if the Ray cluster has GPUs, else 0)")
    p.add_argument("--device", default=None, help="each server's --device (default: its GPU, else the CPU)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started for the pool")


def _pool(args: argparse.Namespace) -> int:
    import signal
    import threading

    from genie.ray import ServerPool

    stop = threading.Event()
    with ServerPool(args.servers, num_gpus_per_server=args.gpus_per_server, device=args.device,
                    num_cpus=args.num_cpus) as pool:
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own
            signal.signal(sig, lambda *_: stop.set())
        print(f"genie pool: {args.servers} servers ready", flush=True)
        print(f"GENIE_SERVER={','.join(pool.addresses)}", flush=True)
        print(f"GENIE_TOKEN={pool.token}", flush=True)
        stop.wait()
    return 0


# -- weights ------------------------------------------------------------------------------------------
def _weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("index",), help="index: build or refresh every file's sidecar index")
    p.add_argument("dir", help="the weights store (what genie serve --weights takes)")


def _weights(args: argparse.Namespace) -> int:
    from genie._errors import WeightsError
    from genie.server import WeightStore

    try:
        n = WeightStore(args.dir).index_all()
    except WeightsError as e:
        print(f"genie weights: {e}", file=sys.stderr)
        return 2
    print(f"genie weights: {n} tensors indexed in {args.dir}")
    return 0


# -- demo -----------------------------------------------------------------------------------------
# ``genie demo`` runs ``genie._demo.main()``; it is listed only when that module exists.
def _demo_args(p: argparse.ArgumentParser) -> None:
    pass


def _demo(args: argparse.Namespace) -> int:
    from genie import _demo  # type: ignore[attr-defined]

    return _demo.main() or 0


def _has_demo() -> bool:
    return importlib.util.find_spec("genie._demo") is not None


# name -> (help, add arguments, run, available); add a subcommand by adding a row.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int], Callable[[], bool]]] = {
    "serve": ("run a Genie accelerator server", _serve_args, _serve, lambda: True),
    "weights": ("index a weights store offline (genie weights index DIR)", _weights_args, _weights,
                lambda: True),
    "demo": ("run a small GPT-2 through Genie and print a report", _demo_args, _demo, _has_demo),
    "pool": ("start N genie servers as Ray actors and print how to connect (genie[ray])", _pool_args, _pool,
             lambda: importlib.util.find_spec("ray") is not None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genie", description="Run PyTorch on a remote accelerator.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_, add_args, run, available) in COMMANDS.items():
        if available():
            p = sub.add_parser(name, help=help_, description=help_)
            add_args(p)
            p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
