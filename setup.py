"""Installs the exported package; metadata, dependencies, extras and the console script come from settings.ini
(nbdev 2). The ranges there are what the package needs; requirements.txt + constraints.txt pin the exact versions
the book was built with, and `make env` installs those."""
from configparser import ConfigParser
from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini")
meta = cfg["DEFAULT"]
words = lambda key: meta.get(key, "").split()
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
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Medical Science Apps.",
                 "Typing :: Typed"],
    python_requires=f">={meta['min_python']}",
    install_requires=words("requirements"),
    extras_require={"book": words("book_requirements"), "test": words("dev_requirements")},
    packages=find_packages(include=["umedpt", "umedpt.*"]),
    package_data={"umedpt": ["py.typed", "pretrained/*/*"]},
    include_package_data=False,
    entry_points={"nbdev": [f"{meta['lib_path']}={meta['lib_path']}._modidx:d"],
                  "console_scripts": words("console_scripts")},
)
