"""Zoo conformance: full-zoo tests are marked ``zoo`` and deselected unless asked for.

    python -m pytest tests/zoo                   # the CI subset only (< 1 minute)
    python -m pytest tests/zoo -m zoo            # every model of every zoo (long)
    FXCAPTURE_ZOO=1 python -m pytest tests/zoo   # everything
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The checker is shared with benchmarks/zoo_report.py: import it by its directory
# (appended, so that `from conftest import ...` in tests/ still finds tests/conftest.py).
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))


def _zoo_requested(config: pytest.Config) -> bool:
    return os.environ.get("FXCAPTURE_ZOO") == "1" or "zoo" in (config.option.markexpr or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _zoo_requested(config):
        return
    kept = [item for item in items if item.get_closest_marker("zoo") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny inputs: intra-op threads only contend (3-10x slower on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
