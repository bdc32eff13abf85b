import os
import sys
from pathlib import Path

import pytest
import torch

# Test helpers shared by several files (builders.py, remote_code.py) import from this folder; the
# repository root stays off sys.path (--import-mode=importlib).
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The Triton interpreter must be on before any kernel module decorates its functions.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# The GPU script sets this so a GPU test can never silently skip on the GPU machine.
REQUIRE_GPU = os.environ.get("MOECACHE_REQUIRE_GPU") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    if REQUIRE_GPU:
        raise pytest.UsageError("MOECACHE_REQUIRE_GPU=1 but torch sees no CUDA device")
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
