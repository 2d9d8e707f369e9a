"""Where the config tree is: one helper for every entry point, checkout and installed wheel alike."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # the saber package directory


def conf_dir() -> Path:
    """The Hydra config tree: saber/conf inside an installed wheel, else conf/ of the checkout.

    The repository keeps conf/ at its top level (the tree users edit); the wheel ships a copy as
    saber/conf (pyproject.toml). User config directories add to it with hydra.searchpath.
    """
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"SABER's config tree is missing: neither {_PACKAGE / 'conf'} (installed wheel) nor "
                            f"{_PACKAGE.parent / 'conf'} (checkout) holds config.yaml; reinstall the package")


CONF_DIR = str(conf_dir())
