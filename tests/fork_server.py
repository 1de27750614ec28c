"""Fork server for tests/test_faults.py's kill -9 test: imports megaent's training stack once, then forks one
`megaent train ...` (`megaent.cli.main(argv)`, the console script's function) per request. Twenty restarts then
cost twenty forks instead of twenty interpreter starts with torch + megatron-core imports (~8 s each on 2 cores).
Nothing is computed before a fork (imports only), so no thread pool is inherited.

Protocol, one line each way on stdin / stdout:
    run ["train", ...] LOG_PATH   ->  PID          (the child's stdout and stderr go to LOG_PATH)
    wait PID                      ->  EXIT_CODE    (negative: killed by that signal)
"""
import json
import os
import sys
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import megaent.cli  # noqa: E402
import megaent.trainer.run  # noqa: E402,F401
import megaent.trainer.trainer  # noqa: E402,F401  (torch, megatron-core, transformers)


def _child(argv: list, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 1
    try:
        code = megaent.cli.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            argv_text, _, log = arg.rpartition(" ")
            pid = os.fork()
            if pid == 0:
                _child(json.loads(argv_text), log)
            print(pid, flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(arg), 0)
            print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    main()
