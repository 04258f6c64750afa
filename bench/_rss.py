"""Run a command and print its wall seconds (from its start to its exit, this helper's own
start left out), CPU seconds and peak RSS (whole process tree waited for) on stderr's last
three lines. ``_common.timed_child`` uses GNU time instead where it is installed."""

import resource
import subprocess
import sys
import time

start = time.monotonic()
proc = subprocess.run(sys.argv[1:])
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"wall_s {wall:.3f}", file=sys.stderr)
print(f"cpu_s {usage.ru_utime + usage.ru_stime:.3f}", file=sys.stderr)
print(f"max_rss_mib {usage.ru_maxrss / 1024:.1f}", file=sys.stderr)
sys.exit(proc.returncode)
