"""Only the package list (everything else is in pyproject.toml): the packages under src/, plus the
top-level conf/ shipped as ``llamalit.conf`` with its group folders (pyproject's package-dir maps it)."""

from setuptools import find_namespace_packages, find_packages, setup

conf = ["llamalit.conf", *(f"llamalit.conf.{group}" for group in find_namespace_packages("conf"))]
setup(packages=[*find_packages("src"), *conf])
