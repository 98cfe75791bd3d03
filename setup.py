"""Build hook: compiles the C helpers in tiermem/native through cffi (API mode)."""
from setuptools import find_packages, setup

setup(
    cffi_modules=["tiermem/native/build.py:ffibuilder"],
    packages=find_packages(include=["tiermem", "tiermem.*", "cxlfork", "cxlfork.*",
                                    "emulation", "emulation.*"]) + ["tiermemd"],
    package_dir={"tiermemd": "daemon/tiermemd"},
    package_data={"tiermem.native": ["*.c", "*.h"], "emulation": ["guest/*"]},
)
