"""Run a command and write its wall seconds and peak RSS to a JSON file:

    python -I -S bench/rusage_exec.py OUT.json COMMAND [ARG...]

Linux carries a process's peak RSS across exec, and a child spawned from the
bench process (vfork) starts with the bench's own peak, hundreds of MiB after
generating data. Forked from this small interpreter instead, a tool's
ru_maxrss is its own (never less than this wrapper's ~8 MiB). Exits with the
command's exit code.
"""

import json
import os
import sys
import time

out, argv = sys.argv[1], sys.argv[2:]
began = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"seconds": time.monotonic() - began, "maxrss_kib": usage.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
