"""Does this environment hold exactly the locked versions?

    .venv/bin/python scripts/check_venv.py [requirements/lock.txt]

Compares every installed distribution with the lock: a locked package that is missing or at
another version, or an installed package the lock does not name, is reported and the exit
status is 1. Allowed beside the lock: this project itself (installed editable), torch at
requirements/torch.txt's pin (a local tag such as +cpu included), the packages that
requirements/not-locked.txt names (torch's CUDA libraries, where a CUDA build was
installed), and pip.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALWAYS_ALLOWED = {"pip", "phatgoose-platform"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock: Path) -> dict[str, str]:
    """name -> version for every `name==version` line of a compiled requirements file."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def read_names(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {canonical(line.strip()) for line in lines if line.strip() and line[0] != "#"}


def problems(lock: Path) -> list[str]:
    pins = read_pins(lock)
    torch_version = read_pins(ROOT / "requirements" / "torch.txt")["torch"]
    not_locked = read_names(ROOT / "requirements" / "not-locked.txt")
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    found = []
    for name, version in sorted(pins.items()):
        if name not in installed:
            found.append(f"{name}: locked at {version}, not installed")
        elif installed[name] != version:
            found.append(f"{name}: locked at {version}, installed {installed[name]}")
    for name, version in sorted(installed.items()):
        if name in pins or name in ALWAYS_ALLOWED or name in not_locked:
            continue
        if name == "torch":
            if version.split("+")[0] != torch_version:
                found.append(f"torch: pinned at {torch_version}, installed {version}")
            continue
        found.append(f"{name}: installed {version}, not in the lock")
    return found


def main() -> int:
    lock = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "requirements" / "lock.txt"
    found = problems(lock)
    for line in found:
        print(f"check_venv: {line}", file=sys.stderr)
    if found:
        print(f"check_venv: {sys.prefix} differs from {lock} ({len(found)} packages)")
        return 1
    print(f"check_venv: {sys.prefix} holds exactly the locked versions ({lock.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
