"""The software and machine behind a figure: one block for reports and every script."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import keras

from volo_convert import __version__

REPORTED_PACKAGES = ("torch", "tensorflow", "keras", "jax", "h5py")
GIGABYTE = 1024**3
MEMINFO = "/proc/meminfo"


def environment() -> dict[str, str]:
    """Versions read from package metadata (so torch need not be imported), the Keras
    backend in use, and the machine."""
    versions = {"volo_convert": __version__, "python": platform.python_version()}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["keras_backend"] = keras.backend.backend()
    versions["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    return versions


def environment_line() -> str:
    """The environment in one line, with the load average, for benchmark tables."""
    versions = environment()
    packages = ", ".join(
        f"{name} {versions[name]}" for name in ("volo_convert", *REPORTED_PACKAGES)
    )
    return (
        f"{packages}; python {versions['python']}, Keras backend {versions['keras_backend']}; "
        f"{versions['machine']}, 1-minute load average {os.getloadavg()[0]:.2f}"
    )


def available_memory_bytes() -> int:
    """Memory the machine can give without swapping: MemAvailable, else all physical memory."""
    try:
        with open(MEMINFO, encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in KiB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
