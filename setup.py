"""Build hook: compiles the C helpers in tiermem/native and cxlfork/native through cffi (API
mode), and cxlfork's static restorer binary (cxlfork/native/build_restorer.py)."""
import os
import runpy

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class BuildExtWithRestorer(build_ext):
    """build_ext, plus the static cxlfork-restorer placed next to cxlfork/native."""

    def run(self):
        super().run()
        mod = runpy.run_path(os.path.join("cxlfork", "native", "build_restorer.py"))
        inplace = self.inplace or getattr(self, "editable_mode", False)
        base = "" if inplace else self.build_lib
        mod["build"](os.path.join(base, "cxlfork", "native"))


setup(
    cffi_modules=["tiermem/native/build.py:ffibuilder", "cxlfork/native/build.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithRestorer},
    packages=find_packages(include=["tiermem", "tiermem.*", "cxlfork", "cxlfork.*",
                                    "emulation", "emulation.*"]) + ["tiermemd"],
    package_dir={"tiermemd": "daemon/tiermemd"},
    package_data={"tiermem.native": ["*.c", "*.h"], "emulation": ["guest/*"],
                  "cxlfork.porter": ["examples/*.toml"], "cxlfork.workers": ["*.c"],
                  "cxlfork.native": ["*.c", "*.h", "*.ld"]},
)
