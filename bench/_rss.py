"""Run a command and print its peak RSS (whole process tree waited for) on stderr's last line."""

import resource
import subprocess
import sys

proc = subprocess.run(sys.argv[1:])
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"max_rss_mib {rss:.1f}", file=sys.stderr)
sys.exit(proc.returncode)
