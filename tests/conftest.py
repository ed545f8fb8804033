import pytest, torch

@pytest.fixture(scope='module')
def one_thread():
    "The machine is shared: with other processes busy, one intra-op thread is many times faster than two"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def pytest_configure(config):
    "Under pytest-xdist (`pytest -n 2`, the README's command) each worker has a core: one torch thread each, not two fighting"
    import os
    if os.environ.get('PYTEST_XDIST_WORKER'): torch.set_num_threads(1)
