import pyro
import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (models built inside are float64)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _fresh_param_store():
    """Each test starts with an empty Pyro param store (a test that uses Pyro's global store on purpose must
    not leak parameters into the next one)."""
    pyro.clear_param_store()
    yield
