import os
import sys

# Before anything imports triton: kernels run under the interpreter on CPU. Only models
# built with kernels="triton" take that path; "auto" stays on the torch reference on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a whole test module (`pytestmark =
    pytest.mark.usefixtures("single_thread")`), like the spawned workers: with tiny shapes
    on a shared 2-core box a second thread only waits on the other tenants (~100x slower
    steps), and a reference computed with the workers' thread count sums in their order."""
    from dist import one_thread
    with one_thread():
        yield
