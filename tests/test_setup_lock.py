"""`make setup` installs from a lock that follows pyproject.toml; the repo root on sys.path (``python -c``
or ``-m`` from a checkout) does not hand transformers Genie's kernels folder as the top-level ``kernels``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ("requirements.lock", "requirements-cuda.lock")  # the Makefile's CPU and CUDA locks
# What the locks are resolved for (the Makefile's `lock` target): CPython 3.11 on x86_64 Linux.
LOCK_ENV = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix"}
SELF = "genie (pyproject.toml"  # uv's `# via genie (pyproject.toml)` (or `...:setup)`): a direct requirement


def _pyproject_requirements() -> tuple[list[Requirement], list[Requirement]]:
    """What `make setup` installs by name: (dependencies, every extra and the dependency groups (pip,
    setuptools), which the locks record as pyproject.toml's; the build backend, built without isolation
    so from the lock too)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    for group in data.get("dependency-groups", {}).values():
        lines += [g for g in group if isinstance(g, str)]  # an {include-group = ...} adds nothing new

    def applies(reqs):
        return [r for r in map(Requirement, reqs) if r.marker is None or r.marker.evaluate(LOCK_ENV)]

    return applies(lines), applies(data["build-system"]["requires"])


def _read_lock(name: str) -> tuple[dict[str, Version], dict[str, list[str]]]:
    """{package: pinned version}, {package: what it is required by} from a uv-compiled lock."""
    pins: dict[str, Version] = {}
    via: dict[str, list[str]] = {}
    current = None
    for n, raw in enumerate((ROOT / name).read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("#"):
            assert not raw[0].isspace() and not line.startswith("-"), f"{name}:{n}: not a pin: {raw!r}"
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, \
                f"{name}:{n}: {raw!r} is not name==version"
            assert not req.extras and req.marker is None and req.url is None, f"{name}:{n}: {raw!r}"
            current = canonicalize_name(req.name)
            assert current not in pins, f"{name}:{n}: {req.name} pinned twice"
            pins[current] = Version(specs[0].version)
            via[current] = []
        elif current is not None and raw[0].isspace():  # `    # via x` or `    # via` + `    #   x`
            text = line.lstrip("#").strip()
            text = text.removeprefix("via").strip()
            if text:
                via[current].append(text)
    return pins, via


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_pins_every_pyproject_requirement(lock):
    pins, via = _read_lock(lock)
    direct_reqs, build_reqs = _pyproject_requirements()
    for req in [*direct_reqs, *build_reqs]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} lacks {req} from pyproject.toml: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{lock} pins {name}=={pins[name]}, outside pyproject.toml's {req}: run `make lock`"
    wanted = {canonicalize_name(r.name) for r in direct_reqs}
    direct = {name for name, sources in via.items() if any(s.startswith(SELF) for s in sources)}
    assert direct == wanted, (f"{lock} is not made from this pyproject.toml (run `make lock`): only in the "
                              f"lock {sorted(direct - wanted)}, only in pyproject {sorted(wanted - direct)}")


def test_locks_torch_cpu_and_cuda():
    """The CPU lock's torch is the +cpu wheel (never a CUDA build on a CPU machine), the CUDA lock's is
    PyPI's, at the same release."""
    cpu, _ = _read_lock("requirements.lock")
    cuda, _ = _read_lock("requirements-cuda.lock")
    assert cpu["torch"].local == "cpu", f"requirements.lock pins torch=={cpu['torch']}, not a +cpu wheel"
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in cpu), "requirements.lock pulls CUDA packages"
    assert cuda["torch"].local is None, f"requirements-cuda.lock pins torch=={cuda['torch']}"
    assert cpu["torch"].public == cuda["torch"].public


_CHILD = """
import json, sys
import genie, transformers
from transformers import GPT2Config, GPT2LMHeadModel
import torch
cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                 eos_token_id=1)
model = GPT2LMHeadModel(cfg).eval()
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
import kernels
print(json.dumps({"file": kernels.__file__,
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] == "kernels"),
                  "path0": sys.path[0], "shape": list(logits.shape)}))
"""


def _run_from_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # the root on sys.path: the case
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_kernels_distribution_wins_over_repo_folder_from_repo_root():
    pytest.importorskip("transformers")
    try:
        dist = metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution (a transformers dependency) is not installed")
    proc = _run_from_root("-c", _CHILD)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["path0"] == ""  # the current directory, the repo root, comes first on sys.path
    assert out["shape"] == [1, 3, 64]
    installed = Path(dist.locate_file("kernels/__init__.py")).resolve()
    got = Path(out["file"]).resolve()
    assert got == installed, f"top-level kernels is {got}, not the distribution's {installed}"
    assert not got.is_relative_to(ROOT / "kernels")
    ours = {f"kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"}
    wrong = ours & set(out["modules"])
    assert not wrong, f"Genie's kernels modules imported under the top-level name: {sorted(wrong)}"


def test_python_m_genie_from_repo_root():
    proc = _run_from_root("-m", "genie", "--help")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "usage" in proc.stdout.lower()
