"""Shared fixtures: the demo corpus and the tiny model (built offline when missing)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402

import mair_config  # noqa: E402


@pytest.fixture(scope="session")
def demo_root():
    """The demo corpus under mair_config.DATA_ROOT, built if missing."""
    if not all(os.path.exists(mair_config.queries_path(t)) for t in mair_config.DEMO_TASK_DOMAIN):
        from dataset import build_demo
        build_demo.build()
    return mair_config.DATA_ROOT


@pytest.fixture(scope="session")
def tiny_model_path(demo_root):
    """Path of the offline tiny model, built if missing."""
    from models import build_tiny
    if not os.path.exists(os.path.join(build_tiny.OUT_DIR, "config.json")):
        build_tiny.build()
    return build_tiny.OUT_DIR


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors and a tiny model: extra threads only add synchronisation (and stall when the
    cores are busy)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
