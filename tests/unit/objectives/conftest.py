import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: intra-op threads only add synchronisation, which on a busy machine costs
    milliseconds per softmax (an OpenMP barrier waiting for a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
