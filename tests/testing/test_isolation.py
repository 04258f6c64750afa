"""``vmvault.testing`` is test machinery: no production module imports it at import time."""

from __future__ import annotations

import subprocess
import sys

CHECK = r"""
import importlib, pathlib, sys
import vmvault
root = pathlib.Path(vmvault.__file__).parent
names = sorted(
    "vmvault." + ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    for p in root.rglob("*.py")
)
skipped = []
for name in names:
    if name.startswith("vmvault.testing") or name.endswith("__main__"):
        continue
    try:
        importlib.import_module(name)
    except ImportError as exc:  # an optional third-party dependency that is not installed
        if (exc.name or "").startswith("vmvault"):
            raise
        skipped.append(name)
loaded = sorted(m for m in sys.modules if m.startswith("vmvault.testing"))
print("loaded:", loaded, "skipped:", skipped, "imported:", len(names))
sys.exit(1 if loaded else 0)
"""


def test_no_production_module_imports_the_testing_package() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded: []" in proc.stdout


def test_the_lab_is_reached_only_when_asked_for() -> None:
    code = (
        "import sys; from vmvault.hypervisors import open_source\n"
        "try:\n    open_source('hyperv-lab:///nonexistent-lab-dir/vm')\nexcept Exception as exc:\n    print(exc)\n"
        "print('vmvault.testing.hyperv_lab' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.strip().splitlines()[-1] == "True", proc.stdout + proc.stderr
    assert "no such folder" in proc.stdout
