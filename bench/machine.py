"""What the benchmarks record about the machine they ran on (every JSON under bench/results/ has it)."""
from __future__ import annotations

import os
import platform


def machine() -> dict[str, object]:
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "cores_allowed": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}
