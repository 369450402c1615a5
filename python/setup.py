"""The wheel carries libkosmos_rt.so, so it is tagged for the platform (any Python 3: the
library is loaded with ctypes, not built against Python)."""

from pathlib import Path

import tomllib
from setuptools import Distribution, setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel


class BinaryDistribution(Distribution):
    """A distribution with native code: its files go to platlib (the wheel's root), not to
    `.data/purelib`, where auditwheel and PyPI refuse a shared library."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


cargo = tomllib.loads((Path(__file__).resolve().parent.parent / "Cargo.toml").read_text())
setup(
    version=cargo["workspace"]["package"]["version"],
    distclass=BinaryDistribution,
    cmdclass={"bdist_wheel": PlatformWheel},
)
