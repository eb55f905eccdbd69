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
    config.addinivalue_line("markers", "slow: the real model's weights, real tokenizer files, whole runs in "
                            "subprocesses or several processes (seconds each); the rest is the fast suite")


# what is slow, in one place: whole modules, tests by name, and every test of the real embedded model
SLOW_MODULES = {"test_tokenizer_families.py", "test_family_runs.py", "test_gguf.py"}
SLOW_TESTS = {"test_ddp_and_fsdp_equal_one_process", "test_sigterm_saves_a_resumable_checkpoint",
              "test_smoke_mode_runs_every_part", "test_plan_matches_measured_peak", "test_extraction_on_a_device",
              "test_stage_evaluation_on_a_device", "test_embedded_prompts_unchanged",
              "test_stopped_or_killed_study_stops_its_run_and_its_minutes_count",
              "test_stop_signal_reaches_the_run_once_and_is_waited_for"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS or \
                {"smollm", "smol", "smollm_tokenizer_fields"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
