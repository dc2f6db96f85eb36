"""What a benchmark ran on: date, machine, library versions. Printed at the top of the report."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "scikit-learn")


@dataclass(frozen=True)
class Environment:
    date: str
    cpu_model: str
    cores: int
    ram_gib: float
    gpu: str | None
    python: str
    versions: dict[str, str]

    def markdown_lines(self) -> list[str]:
        versions = ", ".join(f"{name} {v}" for name, v in self.versions.items())
        return [
            f"- Date: {self.date}",
            f"- Machine: {self.cpu_model}, {self.cores} cores, {self.ram_gib:.1f} GiB RAM, "
            f"GPU: {self.gpu or 'none'}",
            f"- Python {self.python}; {versions}",
        ]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def gpu_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def describe_environment() -> Environment:
    return Environment(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cpu_model=cpu_model(),
        cores=os.cpu_count() or 0,
        ram_gib=ram_gib(),
        gpu=gpu_name(),
        python=sys.version.split()[0],
        versions={name: package_version(name) for name in _PACKAGES},
    )
