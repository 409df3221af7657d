"""Package discovery: every ``fxfuse`` package found in the tree, and the shipped rules from the top-level
``rules/`` folder as ``fxfuse.shipped_rules`` (metadata lives in pyproject.toml)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fxfuse", "fxfuse.*"]) + ["fxfuse.shipped_rules"],
    package_dir={"fxfuse.shipped_rules": "rules"},
)
