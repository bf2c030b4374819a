"""`python(script, *args)`: run a script as a user would, its output captured, in a fork of this
process where that is safe. The tests and the notebooks at the ci scale run the numbered scripts
~200 times; in a fresh interpreter each call first spends 3-8 s importing torch, torchvision and
diffusers, which a fork of a process that has imported them skips."""
import atexit
import os
import random
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def python(script, *args, cwd=ROOT, env=None, timeout=600):
    """`python script args...` with its output captured: a subprocess.CompletedProcess.

    Where it is safe, the script runs in a fork of this process, whose imports are done (see the
    module's docstring): a process of its own (exit code, output, flocks and
    atexit handlers its own, nothing leaking back), with the project's modules imported afresh
    from disk and the random generators as a new interpreter has them. Safe means a POSIX fork,
    one torch thread (a fork after OpenMP threads ran can hang; `make test` sets one), inductor
    compiling in the calling thread (its compile pool's threads are not forked either; conftest sets
    TORCHINDUCTOR_COMPILE_THREADS=1) and CUDA untouched; otherwise, and for DD_TEST_FORK=0, a real
    subprocess."""
    argv = [str(script), *map(str, args)]
    inductor = sys.modules.get("torch._inductor.config")
    if not (hasattr(os, "fork") and os.environ.get("DD_TEST_FORK", "1") != "0"
            and torch.get_num_threads() == 1 and not torch.cuda.is_initialized()
            and (inductor is None or (inductor.compile_threads or 2) <= 1)):
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=timeout)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller
            code = 1
            try:
                code = _child(argv, cwd, env, out.fileno(), err.fileno())
            finally:
                os._exit(code)
        t0 = time.time()
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() - t0 > timeout:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.01)
        text = []
        for f in (out, err):
            f.seek(0)
            text.append(f.read().decode(errors="replace"))
    return subprocess.CompletedProcess([sys.executable, *argv], os.waitstatus_to_exitcode(status),
                                       *text)


def _child(argv, cwd, env, out, err) -> int:
    """Run argv[0] as __main__ in this forked process; its exit code (Python's rules)."""
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.stdin = open(os.devnull)
    try:
        os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        atexit._clear()  # the parent's handlers are not this process's
        for name, mod in list(sys.modules.items()):  # the project's modules afresh from disk
            f = getattr(mod, "__file__", None) or ""
            if f.startswith(str(ROOT)) and "/.venv/" not in f:
                del sys.modules[name]
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        torch.manual_seed(67280421310721)  # a new interpreter's default seed; numpy's and random's
        np.random.seed()                   # come from the OS as they do at start-up
        random.seed()
        code = 0
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        return code
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
