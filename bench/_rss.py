"""Run a command and print its CPU seconds and peak RSS (whole process tree waited for) on
stderr's last two lines."""

import resource
import subprocess
import sys

proc = subprocess.run(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"cpu_s {usage.ru_utime + usage.ru_stime:.3f}", file=sys.stderr)
print(f"max_rss_mib {usage.ru_maxrss / 1024:.1f}", file=sys.stderr)
sys.exit(proc.returncode)
