"""A fork server for crash tests: `python -m tests.reliability.forkserver`.

Importing the coordinator (FastAPI, SQLAlchemy, Alembic, numpy, safetensors; and torch and
transformers, which the release routes import) takes seconds of CPU, tens of seconds on a
loaded machine; the crash test restarts the coordinator dozens of times. This process pays
the imports once, then, for every JSON line on stdin (`{"port": P, "settings": {...},
"environ": {...}}`), forks a child that takes that environment (when given) and builds the
app with `create_app` (the real start-up: migrations, temp-file clean-up, blob checks) and
serves it with uvicorn. It prints the child's pid; the test kills that process with
SIGKILL. Children are reaped here.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> None:
    import uvicorn

    from coordinator.core.app import available_routers, create_app
    from coordinator.core.config import Settings

    available_routers()  # import every route module (releases import torch) before forking
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed children
    print("ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the coordinator process
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                sys.stdin.close()
                if "environ" in command:  # e.g. AWS_* for a coordinator on object storage
                    os.environ.clear()
                    os.environ.update(command["environ"])
                application = create_app(Settings(**command["settings"]))
                uvicorn.run(
                    application,
                    host="127.0.0.1",
                    port=int(command["port"]),
                    log_config=None,
                    access_log=False,
                    log_level="warning",
                )
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
