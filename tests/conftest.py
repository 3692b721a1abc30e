import os

import pytest

# Tests never use a GPU and never touch the network.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (tiny models: intra-op threads only add overhead and stall on a loaded
    2-core machine; the CPU decoder shares rows only with one thread), the previous count restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
