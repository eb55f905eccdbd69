from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the checkout (the project itself is pip-installed)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread (a test or a CLI under test may have changed it): tests use
    tiny batches, and with 2 OpenMP threads on a shared 2-core machine every small matmul waits for
    the other thread (measured 10x slower), so one thread is both faster and steadier."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct through the real loader, loaded once per test session."""
    from ivft.load import load_model
    model, tok = load_model(None)
    return model, tok


def pytest_configure(config):
    # `-m "not slow"` is the fast suite: what every fork of the method must keep green
    # (tests/test_readme.py::test_forks_stay_green runs it on a copy with each documented fork)
    config.addinivalue_line("markers", "slow: a whole run or the real model's weights (seconds to minutes)")
