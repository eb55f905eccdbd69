import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# two cores: more threads than that only adds contention
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct through the real loader, loaded once per test session."""
    from load import load_model
    model, tok = load_model(None)
    return model, tok
