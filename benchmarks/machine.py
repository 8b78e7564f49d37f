"""Where and when a benchmark ran: recorded beside every result so numbers stay comparable."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from phatgoose.precision import cpu_bf16_flags


def cpu_model() -> str:
    """The CPU's marketing name (Linux `/proc/cpuinfo`), or what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (how busy the machine was), or None."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, object]:
    """CPU, cores, threads torch uses, library versions, the command line, date and load."""
    import peft
    import transformers

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        # Native bfloat16 matrix units, what `auto` precision follows (phatgoose.precision).
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        "cores": os.cpu_count(),
        "cores_available": len(affinity) if affinity is not None else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "load_average_start": load_average(),
    }
