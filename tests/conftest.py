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
