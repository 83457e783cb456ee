import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A backend for the demo model on the CPU, one per test module, and its cache directory."""
    from moeviz.backend import Backend

    cache = tmp_path_factory.mktemp("cache")
    client = Backend.start("demo", device="cpu", cache_dir=str(cache))
    yield client, cache
    client.stop()
