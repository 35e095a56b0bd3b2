"""Maps services/<name> into the `deepserve.<name>` import namespace (pyproject.toml holds the rest).

setuptools cannot express "every subpackage of services/x becomes deepserve.x.*" declaratively,
so the package list is computed here; new subpackages need no edit.
"""

from pathlib import Path

from setuptools import find_packages, setup

SERVICES = ("gateway", "jobmgr", "scheduler", "podpool", "flowserve")


def package_dirs() -> dict[str, str]:
    dirs = {"deepserve": "libs/deepserve"}
    for sub in find_packages("libs/deepserve"):
        dirs[f"deepserve.{sub}"] = f"libs/deepserve/{sub.replace('.', '/')}"
    for service in SERVICES:
        root = Path("services") / service
        dirs[f"deepserve.{service}"] = root.as_posix()
        for sub in find_packages(root.as_posix()):
            dirs[f"deepserve.{service}.{sub}"] = (root / sub.replace(".", "/")).as_posix()
    return dirs


DIRS = package_dirs()
setup(packages=sorted(DIRS), package_dir=DIRS)
