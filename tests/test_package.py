"""The installed package: its version and the typing marker it ships."""

import importlib.metadata
import pathlib

import ddpm_bs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distributions():
    assert ddpm_bs.__version__ == importlib.metadata.version("ddpm_bs") != "0+unknown"
    assert f'version = "{ddpm_bs.__version__}"' in (ROOT / "pyproject.toml").read_text()


def test_py_typed_ships_with_the_package():
    assert (pathlib.Path(ddpm_bs.__file__).parent / "py.typed").is_file()
    assert 'ddpm_bs = ["assets/*.npz", "py.typed"]' in (ROOT / "pyproject.toml").read_text()
