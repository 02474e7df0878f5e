import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DEV = "remote_accelerator:0"


@pytest.fixture
def dev() -> str:
    return DEV
