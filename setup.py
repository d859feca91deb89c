"""Packaging hook: the pipeline configs of `jobs/configs/` ship inside the wheel, as
`sdftlab/configs/*.yaml`, so a non-editable install can run `sdftlab demo`
(`sdftlab.config_files.packaged_config`). Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "jobs" / "configs"


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "sdftlab" / "configs"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(CONFIGS.glob("*.yaml")):
            shutil.copy2(path, target / path.name)


setup(cmdclass={"build_py": BuildWithConfigs})
