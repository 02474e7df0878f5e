import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# servers the tests start (fixtures, the embedded default) stop at generated code: an Inductor compile
# burns a core for tens of seconds; the tier-2 tests ask for it (--compile inductor)
os.environ.setdefault("GENIE_COMPILE", "codegen")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DEV = "remote_accelerator:0"


@pytest.fixture
def dev() -> str:
    return DEV


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    """Grad mode is process-wide for the main thread: a test that turns it off must not change the
    next test's (the kernels refuse grad only when it is on)."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


# -- the kernel tests' shared setup (test_kernels_*.py take it with ``pytestmark``) -----------------
KERNEL_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BF16_INTERPRETER = "Triton 3.9's interpreter returns garbage for tl.dot on bf16; checked on a GPU"


@pytest.fixture(scope="module")
def triton_interpreter():
    """Genie's Triton kernels run in Triton's interpreter on the CPU for the whole module (the
    kernels read GENIE_TRITON_INTERPRET at call time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GENIE_TRITON_INTERPRET", "1")
        yield


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)


def skip_bf16_dot_on_cpu(dtype: torch.dtype, device: str) -> None:
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip(BF16_INTERPRETER)
