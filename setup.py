"""Builds only the native module ``rlhf_fast._C``; all metadata lives in pyproject.toml.

Switches (as in flash-attn's setup.py):
  RLHF_FAST_SKIP_CPP_BUILD=1  skip the C++ build; the package then runs on its Python fallbacks.
  MAX_JOBS=N                  parallel compile jobs (default: all cores).
A missing or broken compiler is a warning, not a failure: the package still installs and works.
"""
import glob
import os
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed native build into a warning."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure must not block the install
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        warnings.warn(
            f"rlhf_fast: building the C++ extension failed ({exc}); "
            "installing without it, the pure-Python fallbacks will be used."
        )


def native_extensions():
    if os.environ.get("RLHF_FAST_SKIP_CPP_BUILD", "0") == "1":
        return []
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:
        warnings.warn("rlhf_fast: pybind11 is not installed; skipping the C++ extension.")
        return []
    ParallelCompile("MAX_JOBS").install()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    return [
        Pybind11Extension(
            "rlhf_fast._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
