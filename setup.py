"""Installs the exported package; metadata comes from settings.ini (nbdev 2). Dependencies are pinned in
requirements.txt + constraints.txt and installed by `make env`, so none are declared here."""
from configparser import ConfigParser
from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini")
meta = cfg["DEFAULT"]
setup(
    name=meta["lib_name"],
    version=meta["version"],
    description=meta["description"],
    keywords=meta["keywords"].split(),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    author=meta["author"],
    author_email=meta["author_email"],
    url=meta["git_url"],
    project_urls={"Documentation": meta["doc_host"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Medical Science Apps."],
    install_requires=[],
    extras_require={},
    packages=find_packages(include=["umedpt", "umedpt.*"]),
    entry_points={"nbdev": [f"{meta['lib_path']}={meta['lib_path']}._modidx:d"], "console_scripts": []},
)
