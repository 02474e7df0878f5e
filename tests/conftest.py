import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

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
