"""What long repository work (check, prune, repair, copy) reports as it goes.

``PhaseCallback(phase, done, total)``: the named phase has done ``done`` of ``total`` units
(bytes or objects; ``total`` 0 = unknown). The CLI adapts it to a
``vmvault.engine.progress.ProgressReporter`` bar; tests record the calls. The backup and
restore engine report through that reporter directly.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PhaseCallback"]

PhaseCallback = Callable[[str, int, int], None]
