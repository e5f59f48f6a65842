"""What machine a number was measured on, and an export was built or checked on.

Speed and int8 behaviour depend on the processor's instruction set: int8
kernels without VNNI multiply-add through 16-bit intermediates that can
saturate, bfloat16 is native only with AVX512-BF16 or AMX. So every benchmark
JSON, every export and every probe at load records the CPU and the flags that
matter, the libraries that ran, and how busy the machine was.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

#: /proc/cpuinfo flags that change which int8, bfloat16 and float kernels run
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")
#: libraries whose version changes a number
LIBRARIES = ("anomap", "torch", "numpy", "onnxruntime", "openvino", "pillow")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str | None, set[str]]:
    """(model name, flags) from /proc/cpuinfo; (platform's name, empty) elsewhere."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return platform.processor() or None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def has_vnni(flags: set[str] | None = None) -> bool:
    """True when int8 dot products accumulate in 32 bits in one instruction."""
    flags = cpu_flags()[1] if flags is None else flags
    return not flags.isdisjoint({"avx512_vnni", "avx_vnni", "amx_int8"})


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_machine() -> dict[str, Any]:
    """A JSON-ready record of this machine: CPU model, cores, ISA flags, libraries, load."""
    model, flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    record: dict[str, Any] = {
        "cpu": model, "arch": platform.machine(), "logical_cores": os.cpu_count(),
        "usable_cores": usable, "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "int8_dot_product": "vnni" if has_vnni(flags) else "no vnni (16-bit intermediates)",
        "os": platform.platform(), "python": platform.python_version(),
        "libraries": library_versions(), "load_average_1_5_15_min": load,
    }
    try:  # torch is a dependency, but keep this module importable without it
        import torch

        record["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            record["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return record


def machine_line(record: dict[str, Any] | None = None) -> str:
    """One line for tables and logs: 'Intel Xeon ..., 2 cores, AVX-512 VNNI'."""
    record = record or describe_machine()
    isa = record.get("isa", {})
    best = next((label for flag, label in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"),
                                           ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX-512"),
                                           ("avx2", "AVX2")) if isa.get(flag)), "no AVX2")
    return f"{record.get('cpu') or record.get('arch')}, {record.get('usable_cores')} cores, {best}"


def memory_bytes(field: str = "VmRSS", pid: int | str = "self") -> int:
    """A process's memory from /proc (Linux; 0 where unknown): ``VmRSS`` resident now,
    ``VmHWM`` its peak. The service states its budget from it; benchmarks sample it."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
