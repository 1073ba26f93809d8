"""The filter that native output (C++ logs, gloo's notes) of a process in a distributed job passes through.

    python jamba_jax/native_output.py NAME PROCESS PROCESSES   (stdin: the process's native fd 1 and 2)

Run by ``distributed.route_native_output`` as a separate small process (it imports nothing of jamba_jax
or JAX), so that it outlives the process it serves. When JAX's distributed runtime finds another process
dead it aborts with a fatal log and a native stack trace; this filter turns that into one line:

    NAME: error: the distributed job lost a process (REASON); ending process PROCESS of PROCESSES

Lines are held back while the process runs and written to stderr when it ends, except gloo's
connection notes, and everything after an abort or after ``END_MARKER`` (the process has printed its
own one-line error and ends on purpose).
"""

from __future__ import annotations

import collections
import re
import signal
import sys

END_MARKER = "\x00jamba-job-ended"
FATAL = "Terminating process because the JAX distributed service detected fatal errors"
_HELD_LINES = 200
# gloo's "[Gloo] Rank 3 is connected to 7 peer ranks. ..." (its threads' writes may split a line)
GLOO_NOTE = re.compile(r"\[Gloo\]|connected to \d+ peer ranks|Expected number of connected peer ranks")


def reason_of(text: str) -> str:
    """The status of JAX's fatal line, e.g. ``UNAVAILABLE: Failed to send RPC to coordination service``."""
    match = re.search(r"absl::Status: ([A-Z_]+: [^.\n]*)", text)
    return match.group(1).strip() if match else "another process died or the coordinator is unreachable"


def main(name: str, process: str, processes: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the process it serves
    held: collections.deque[str] = collections.deque(maxlen=_HELD_LINES)
    fatal = None
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", "replace")
        if line.startswith(END_MARKER):
            return 0
        if FATAL in line:
            fatal = line
            continue
        if fatal is not None:
            fatal += line  # the status continues over the next lines; the stack trace follows
            continue
        if not GLOO_NOTE.search(line):
            held.append(line)
    if fatal is not None:
        print(f"{name}: error: the distributed job lost a process ({reason_of(fatal)}); "
              f"ending process {process} of {processes}", file=sys.stderr, flush=True)
        return 0
    sys.stderr.writelines(held)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
