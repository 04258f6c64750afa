"""Loading a Python binding that Debian ships for its system Python only.

Debian's ``python3-libnbd`` and ``python3-libvirt`` put a pure-Python wrapper and a C
extension built for the system CPython into ``/usr/lib/python3/dist-packages``. Another
Python of the same version (pyenv, a virtual environment) can load them, but adding all of
dist-packages to its path would pull in every other system module. So the few files are
linked into a private temporary folder, imported from there, and the folder is removed
again (a loaded module no longer needs its files).
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
import tempfile
from types import ModuleType

__all__ = ["DIST_PACKAGES", "import_system_module"]

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def import_system_module(name: str, extensions: tuple[str, ...], *, dist: str | None = None) -> ModuleType | None:
    """``import name``, else the module ``name`` from Debian's ``dist`` folder, or None.

    ``extensions`` are the stems of the C extensions the wrapper imports (``libnbdmod``,
    ``libvirtmod``); only builds for this interpreter's version (``cpython-311``) are used.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    dist = dist or DIST_PACKAGES
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    wrapper = os.path.join(dist, f"{name}.py")
    files = [wrapper]
    for stem in extensions:
        libs = sorted(glob.glob(os.path.join(dist, f"{stem}.{tag}-*.so")))
        if not libs:
            return None
        files.append(libs[0])
    if not os.path.exists(wrapper):
        return None
    folder = tempfile.mkdtemp(prefix=f"vmvault-import-{name}-")
    try:
        for src in files:
            os.symlink(src, os.path.join(folder, os.path.basename(src)))
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        except ImportError:
            return None
        finally:
            sys.path.remove(folder)
    finally:
        for entry in os.listdir(folder):
            os.unlink(os.path.join(folder, entry))
        os.rmdir(folder)
