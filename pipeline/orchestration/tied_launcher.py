"""A Python launcher that ties a server process to its parent: the kernel stops it when the parent dies,
however it dies (a stage killed with -9 would otherwise leave its Prefect server running)."""

# `python -c TIED_LAUNCHER <parent pid> <python arguments...>` runs in the server's process before the server:
# it asks the kernel for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG = 1; kept across exec), then
# becomes `python <python arguments...>`. If the parent died before the request took effect, it stops at
# once. Elsewhere than Linux there is no prctl and the server is stopped only by the normal exit path.
TIED_LAUNCHER = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
except (AttributeError, OSError):
    pass
if os.getppid() != parent:
    sys.exit(0)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""

