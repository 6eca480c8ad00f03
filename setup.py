"""Packaging beyond what pyproject.toml can say: the repository's conf/ ships inside the wheel as
the `unclip.conf` package data (Hydra configs, open_clip architectures), where
`unclip.resources` finds it through importlib.resources."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["unclip", "unclip.*"]), "unclip.conf"],
    package_dir={"unclip.conf": "conf"},
    package_data={"unclip.conf": ["**/*.yaml", "**/*.json", "**/*.md"]},
)
