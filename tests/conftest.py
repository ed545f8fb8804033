import pytest, torch

@pytest.fixture(scope='module')
def one_thread():
    "The machine is shared: with other processes busy, one intra-op thread is many times faster than two"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
