"""Shared fixtures: models are loaded once per session; IPython shells are real."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama():
    import effnb

    return effnb.load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert():
    import effnb

    return effnb.load_model("tiny-bert")


@pytest.fixture(scope="session")
def smollm2():
    import effnb

    return effnb.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    import effnb

    return effnb.load_model("minilm-l6")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``).

    Two threads cost ~10x the CPU time per training step on tiny models here (thread hand-offs dwarf
    64-wide matmuls, worse on a loaded machine). The previous setting is restored for the other files.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def ip():
    """A real IPython shell with effnb's extension loaded."""
    from IPython.testing.globalipapp import get_ipython

    shell = get_ipython()
    shell.run_line_magic("load_ext", "effnb")
    yield shell
    for name in [k for k in shell.user_ns if not k.startswith("_") and k not in ("In", "Out", "exit", "quit", "get_ipython")]:
        shell.user_ns.pop(name, None)

