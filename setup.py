"""What pyproject.toml cannot say: the top-level `kernels/` folder installs as the `eej.kernels` package.

(The design card wants kernels/ at the top level; the import name `kernels` is taken on PyPI, so it
lives inside the eej namespace.) Everything else is configured in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["eej", "eej.*"]), "eej.kernels",
              *(f"eej.kernels.{p}" for p in find_packages("kernels"))],
    package_dir={"eej.kernels": "kernels"},
    package_data={"eej.kernels": ["*.cc", "*.h"]},  # the CPU kernels' C++ sources, compiled on first use
)
