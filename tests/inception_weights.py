"""A legacy-mode Inception weights file with the fixed random initialisation, written once per test session
(91 MiB, about a second): tests load it through the same code as torch-fidelity's real file."""
import pytest

from eval import inception


def write(path) -> str:
    inception.write_random_weights(str(path))
    return str(path)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    return write(tmp_path_factory.mktemp("inception") / inception.LEGACY_FILE)
