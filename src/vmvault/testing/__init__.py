"""Test machinery shipped with vmvault: the Hyper-V lab host (``hyperv_lab``).

Nothing in vmvault's production code imports this package at import time (a test checks it);
``hyperv-lab://`` sources and their clone hook reach it through lazy imports.
"""
