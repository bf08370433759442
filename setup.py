"""Installs the exported package; metadata comes from settings.ini (nbdev 2)."""
from configparser import ConfigParser
from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini")
meta = cfg["DEFAULT"]
setup(
    name=meta["lib_name"],
    version=meta["version"],
    description=meta["description"],
    license="Apache-2.0",
    python_requires=">=" + meta["min_python"],
    packages=find_packages(include=["umedpt", "umedpt.*"]),
    entry_points={"nbdev": [f"{meta['lib_path']}={meta['lib_path']}._modidx:d"]},
)
