"""Files the package reads at run time: the Hydra configs and open_clip architectures of conf/.

A wheel carries them as `unclip/conf` (setup.py maps the repository's conf/ there), found through
importlib.resources; a source checkout or editable install reads the repository's conf/ itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def conf_dir() -> Path:
    packaged = resources.files("unclip") / "conf"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / "conf"


def conf_path(*parts: str) -> Path:
    """A file or folder under conf/, e.g. conf_path("clip_arch")."""
    return conf_dir().joinpath(*parts)
