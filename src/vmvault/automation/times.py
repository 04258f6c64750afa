"""Moved to :mod:`vmvault.times` (one module for every layer: the repository's JSON shapes
and the command line use it too); these names stay importable from here."""

from __future__ import annotations

from vmvault.times import duration, iso_time, local_time, zone_name

__all__ = ["duration", "iso_time", "local_time", "zone_name"]
