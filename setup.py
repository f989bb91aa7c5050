# Metadata lives in pyproject.toml. The native CPU kernel (csrc/) is compiled on first use
# through torch.utils.cpp_extension, so the package installs without a compiler and keeps
# working without one. Its sources live at the top of the repository; a built package carries
# a copy in renio_kernels/_csrc so an installed (non-editable) copy can still compile them.
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithCsrc(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "renio_kernels" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").glob("*.[ch]*")):
            self.copy_file(str(src), str(target / src.name))


setup(cmdclass={"build_py": BuildPyWithCsrc})
