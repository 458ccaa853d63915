"""How the spawned distributed test workers end."""
import os
import sys


def skip_native_teardown():
    """Ends a worker whose results are written and whose process group is destroyed, skipping
    the interpreter's and the C++ libraries' teardown: in about 3% of runs on the development VM
    a worker aborted there ("terminate called without an active exception", SIGABRT, no Python
    frame per faulthandler), after its work was done. A worker that fails before this point
    still exits with an error."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
