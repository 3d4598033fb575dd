"""Hostile programs against the HumanEval sandbox (data/sandbox.py), under every launcher this machine has: the
isolating ones (bubblewrap, unshare) and the plain one that only limits and audits. Each case asserts the refusal
the program meets and that nothing outside changed; the isolation cases run plain programs (no guard, no audit
hook) under the launcher's namespaces, so that they test the operating system's boundary alone."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from data import sandbox

pytestmark = pytest.mark.usefixtures("sandbox_alone")

LAUNCHERS = sandbox.launchers()
ISOLATING = [chosen for chosen in LAUNCHERS if chosen.isolated]
QUICK_S = 5.0  # a case that should end by itself; hanging cases get HANG_S
HANG_S = 1.0


@pytest.fixture(params=LAUNCHERS, ids=[chosen.name for chosen in LAUNCHERS])
def run(request, monkeypatch):
    """run_sandboxed under one launcher."""
    monkeypatch.setattr(sandbox, "launcher", lambda: request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sandbox.warn_if_open()  # said once here, so that the cases below do not repeat it
    return sandbox.run_sandboxed


@pytest.fixture
def place():
    """Host files a program must not touch: a victim file, a folder, a path for a new file, a listening socket.
    Outside /tmp, which is the program's own (and empty) /tmp under isolation."""
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else os.path.expanduser("~")
    folder = tempfile.TemporaryDirectory(prefix="decoderstack_hostile_", dir=base)
    tmp_path = Path(folder.name)
    tmp_path.chmod(0o755)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "empty").mkdir()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    yield {"dir": str(tmp_path), "victim": str(victim), "new": str(tmp_path / "new.txt"),
           "empty": str(tmp_path / "empty"), "port": server.getsockname()[1], "server": server, "path": tmp_path}
    server.close()
    folder.cleanup()


def untouched(place: dict) -> None:
    """Nothing outside the sandbox changed: the victim, its mode, the folders, and nobody connected."""
    path = place["path"]
    assert Path(place["victim"]).read_text() == "keep me"
    assert Path(place["victim"]).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.iterdir()) == ["empty", "victim.txt"]
    with pytest.raises(socket.timeout):
        place["server"].accept()


# (name, program with {dir}/{victim}/{new}/{empty}/{port} filled in, the refusal in stderr)
REFUSED = [
    ("write outside", "open({new!r}, 'w').write('x')", "sandbox: opening"),
    ("append to a file outside", "open({victim!r}, 'a').write('x')", "sandbox: opening"),
    ("read-write outside", "open({victim!r}, 'r+').write('x')", "sandbox: opening"),
    ("os.open outside", "import os\nos.open({new!r}, os.O_WRONLY | os.O_CREAT)", "sandbox: opening"),
    ("os.open truncate outside", "import os\nos.open({victim!r}, os.O_TRUNC)", "sandbox: opening"),
    ("relative escape", "open('../' * 30 + {new!r}[1:], 'w')", "sandbox: opening"),
    ("bytes path outside", "open({new!r}.encode(), 'w')", "sandbox: opening"),
    ("pathlib path", "import pathlib\npathlib.Path({new!r}).write_text('x')", "sandbox: opening"),
    ("os.open through dir_fd", "import os\nd = os.open({dir!r}, os.O_RDONLY)\n"
                               "os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d)", "sandbox: opening"),
    ("directory handle", "import os\nos.open({dir!r}, os.O_RDONLY | os.O_DIRECTORY)", "sandbox: opening"),
    ("remove", "import os\nos.remove({victim!r})", "sandbox: os.remove outside"),
    ("unlink", "import os\nos.unlink({victim!r})", "sandbox: os.remove outside"),
    ("remove through dir_fd", "import os\nos.remove('victim.txt', dir_fd=os.open('.', os.O_RDONLY))",
     "sandbox: os.remove outside"),
    ("rmdir", "import os\nos.rmdir({empty!r})", "sandbox: os.rmdir outside"),
    ("rename out", "import os\nos.rename({victim!r}, 'stolen.txt')", "sandbox: os.rename outside"),
    ("replace in", "open('mine', 'w').close()\nimport os\nos.replace('mine', {victim!r})",
     "sandbox: os.rename outside"),
    ("rename through dir_fds", "import os\nd = os.open('.', os.O_RDONLY)\n"
                               "os.rename('a', 'b', src_dir_fd=d, dst_dir_fd=d)", "sandbox: os.rename outside"),
    ("chmod", "import os\nos.chmod({victim!r}, 0o777)", "sandbox: os.chmod outside"),
    ("fchmod", "import os\nos.fchmod(os.open({victim!r}, os.O_RDONLY), 0o777)", "sandbox: os.chmod outside"),
    ("chmod through dir_fd", "import os\nos.chmod('x', 0o777, dir_fd=os.open('.', os.O_RDONLY))",
     "sandbox: os.chmod outside"),
    ("chown", "import os\nos.chown({victim!r}, 0, 0)", "sandbox: os.chown outside"),
    ("truncate", "import os\nos.truncate({victim!r}, 0)", "sandbox: os.truncate outside"),
    ("ftruncate", "import os\nos.ftruncate(os.open({victim!r}, os.O_RDONLY), 0)", "sandbox: os.truncate outside"),
    ("utime", "import os\nos.utime({victim!r}, (0, 0))", "sandbox: os.utime outside"),
    ("mkdir outside", "import os\nos.mkdir({new!r})", "sandbox: os.mkdir outside"),
    ("rmtree", "import shutil\nshutil.rmtree({dir!r})", "sandbox: shutil.rmtree outside"),
    ("move", "import shutil\nshutil.move({victim!r}, 'here')", "sandbox: shutil.move outside"),
    ("copy out", "open('mine', 'w').close()\nimport shutil\nshutil.copyfile('mine', {new!r})",
     "sandbox: shutil.copyfile outside"),
    ("symlink", "import os\nos.symlink({victim!r}, 'link')", "sandbox: os.symlink is not allowed"),
    ("hard link", "import os\nos.link({victim!r}, 'link')", "sandbox: os.link is not allowed"),
    ("chdir", "import os\nos.chdir({dir!r})\nopen('new.txt', 'w')", "sandbox: os.chdir is not allowed"),
    ("fchdir", "import os\nos.fchdir(os.open('.', os.O_RDONLY))", "sandbox: os.chdir is not allowed"),
    ("hook tables through __main__", "import sys\nvars(sys.modules['__main__']).clear()\nopen({new!r}, 'w')",
     "sandbox: opening"),
    ("replaced realpath", "import os\nos.path.realpath = lambda p, **k: '/tmp/x'\n"
                          "os.path.abspath = lambda p: '/tmp/x'\nopen({new!r}, 'w')", "sandbox: opening"),
    ("replaced stat", "import os\nos.stat = lambda *a, **k: None\nos.open({dir!r}, os.O_RDONLY)", "sandbox: opening"),
    ("replaced fspath", "import os\nos.fspath = lambda p: 'inside'\nopen({new!r}, 'w')", "sandbox: opening"),
    ("os.system", "import os\nos.system('touch {new}')", "sandbox: os.system is not allowed"),
    ("popen", "import os\nos.popen('touch {new}')", "sandbox: importing _posixsubprocess is not allowed"),
    ("subprocess", "import subprocess\nsubprocess.run(['touch', {new!r}])", "sandbox: importing _posixsubprocess"),
    ("fork", "import os\nos.fork()", "sandbox: os.fork is not allowed"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "sandbox: os.fork is not allowed"),
    ("forkpty", "import os\nos.forkpty()", "sandbox: os.forkpty is not allowed"),
    ("posix_spawn", "import os\nos.posix_spawn('/bin/touch', ['touch', {new!r}], {{}})", "sandbox: os.posix_spawn"),
    ("execv", "import os\nos.execv('/bin/touch', ['touch', {new!r}])", "sandbox: os.exec is not allowed"),
    ("spawnv", "import os\nos.spawnv(os.P_WAIT, '/bin/touch', ['touch', {new!r}])", "sandbox: os."),
    ("_posixsubprocess", "import _posixsubprocess", "sandbox: importing _posixsubprocess"),
    ("multiprocessing", "import multiprocessing\nmultiprocessing.Process(target=print).start()", "sandbox: "),
    ("tcp connect", "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", "sandbox: socket."),
    ("raw socket", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)", "sandbox: socket.__new__"),
    ("udp", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))",
     "sandbox: socket.__new__"),
    ("dns", "import socket\nsocket.getaddrinfo('example.com', 80)", "sandbox: socket.getaddrinfo"),
    ("urllib", "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
     "sandbox: socket."),
    ("kill the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "sandbox: os.kill is not allowed"),
    ("kill everything", "import os, signal\nos.kill(-1, signal.SIGKILL)", "sandbox: os.kill is not allowed"),
    ("killpg", "import os, signal\nos.killpg(0, signal.SIGKILL)", "sandbox: os.killpg is not allowed"),
    ("pthread_kill", "import signal, threading\nsignal.pthread_kill(threading.main_thread().ident, 9)",
     "sandbox: signal.pthread_kill"),
    ("ctypes", "import ctypes\nctypes.CDLL(None)", "sandbox: importing ctypes is not allowed"),
    ("_ctypes", "import _ctypes", "sandbox: importing _ctypes is not allowed"),
    ("gc objects", "import gc\ngc.get_objects()", "sandbox: gc.get_objects is not allowed"),
    ("gc referrers", "import gc\ngc.get_referrers(print)", "sandbox: gc.get_referrers is not allowed"),
    ("subinterpreters", "import _xxsubinterpreters", "sandbox: importing _xxsubinterpreters"),
    ("mmap", "import mmap\nmmap.mmap(-1, 4096)", "sandbox: mmap.__new__ is not allowed"),
    ("settrace", "import sys\nsys.settrace(lambda *a: None)", "sandbox: sys.settrace is not allowed"),
    ("setprofile", "import sys\nsys.setprofile(lambda *a: None)", "sandbox: sys.setprofile is not allowed"),
    ("own memory", "open('/proc/self/mem', 'rb')", "sandbox: opening '/proc/self/mem' is not allowed"),
    ("memory through a link", "import os\nos.symlink('/proc/self', 's')\nopen('s/mem', 'rb')",
     "sandbox: os.symlink is not allowed"),
    ("memory, relative", "open('../' * 30 + 'proc/self/mem', 'rb')", "is not allowed"),
    ("parent environment", "import os\nopen(f'/proc/{{os.getppid()}}/environ', 'rb')", "sandbox: opening '/proc/"),
    ("init environment", "open('/proc/1/environ', 'rb')", "sandbox: opening '/proc/1/environ' is not allowed"),
    ("stdout file", "open('../stdout', 'w').write('nonce')", "sandbox: opening '../stdout' outside"),
    ("stderr file", "import os\nos.replace('x', '../stderr')", "sandbox: os.rename outside"),
    ("files that fill the folder", "for i in range(100):\n    open(f'f{{i}}', 'wb').write(b'x' * (8 << 20))",
     "sandbox: open: more than"),
    ("one file rewritten", "for i in range(100):\n    open('f', 'ab').write(b'x')", "sandbox: open: more than"),
    ("folders that fill the folder", "import os\nfor i in range(10000):\n    os.mkdir(f'd{{i}}')",
     "sandbox: os.mkdir: more than"),
    ("files through os.open", "import os\nfor i in range(100):\n    os.close(os.open(f'f{{i}}', os.O_CREAT))",
     "sandbox: open: more than"),
]


@pytest.mark.parametrize("name,program,refusal", REFUSED, ids=[case[0] for case in REFUSED])
def test_refused(run, place, name, program, refusal):
    result = run(program.format(**place), timeout_s=QUICK_S)
    assert result.status == "failed" and refusal in result.stderr, result
    untouched(place)


# A pass without running the tests: the verdict is the guard's nonce, and these never let the guard write it.
FORGED = [
    ("os._exit(0) before the tests", "import os\nos._exit(0)\nassert False"),
    ("sys.exit(0) before the tests", "import sys\nsys.exit(0)\nassert False"),
    ("SystemExit(0)", "raise SystemExit(0)\nassert False"),
    ("exit() builtin", "exit()\nassert False"),
    ("KeyboardInterrupt", "raise KeyboardInterrupt\nassert False"),
    ("print PASSED", "print('PASSED')\nimport os\nos._exit(0)"),
    ("write to every descriptor", "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n"
                                  "    except OSError:\n        pass\nos._exit(0)"),
    ("close every descriptor", "import os\nos.closerange(3, 64)\nassert False"),
    ("read stdin for the nonce", "import os, sys\nprint(os.read(0, 100), sys.stdin.read())\nos._exit(0)"),
    ("atexit", "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(1)"),
    ("thread exits", "import threading, sys\nthreading.Thread(target=sys.exit).start()\nraise SystemExit(0)"),
    ("guard functions", "import sys\nm = sys.modules['__main__']\nprint(vars(m).keys())\nm.main()\nimport os\n"
                        "os._exit(0)"),
    ("code constants", "import sys\nprint(sys.modules['__main__'].main.__code__.co_consts)\nimport os\nos._exit(0)"),
    ("excepthook", "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\nassert False"),
    ("signal", "import os, signal\nsignal.raise_signal(signal.SIGTERM)\nassert False"),
    # the guard's thread raises audit events while it waits (time.sleep's, from Python 3.13): a hook of the
    # program's would run there, next to the guard's frame and its nonce
    ("audit hook in the guard's thread",
     "import os, sys, time\ngot = []\ndef hook(event, args):\n    f = sys._getframe(1)\n"
     "    while f is not None and not got:\n        got.extend(v for k, v in f.f_locals.items() if k == 'nonce')\n"
     "        f = f.f_back\ntry:\n    sys.addaudithook(hook)\nexcept PermissionError:\n    pass\n"
     "time.sleep(1)\nfor fd in range(3, 64):\n    try:\n        os.write(fd, got[0])\n"
     "    except (OSError, IndexError):\n        pass\nos._exit(0)"),
]


@pytest.mark.parametrize("name,program", FORGED, ids=[case[0] for case in FORGED])
def test_forged_pass_fails(run, name, program):
    result = run(program, timeout_s=QUICK_S)
    assert result.status == "failed", result
    assert re.search(r"\b[0-9a-f]{32}\b", result.stdout + result.stderr) is None  # the nonce never showed


def test_exit_status_zero_is_not_a_pass(run):
    result = run("import os\nos._exit(0)", timeout_s=QUICK_S)
    assert (result.status, result.returncode) == ("failed", 0)


# Programs that would run forever, or take all of something: each ends failed or at the time limit.
CONTAINED = [
    ("infinite loop", "while True:\n    pass", "timeout", ""),
    ("sleep", "import time\ntime.sleep(60)", "timeout", ""),
    ("spinning threads", "import threading\ndef spin():\n    while True:\n        pass\n"
                         "for _ in range(3):\n    threading.Thread(target=spin).start()\nspin()", "timeout", ""),
    ("signal handlers", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)", "failed",
     "signal only works in main thread"),
    ("tests pass, a thread stays", "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()",
     "passed", ""),  # the guard ends the process once the verdict is written
    ("setsid then loop", "import os\ntry:\n    os.setsid()\nexcept OSError:\n    pass\nwhile True:\n    pass",
     "timeout", ""),
    ("memory bomb", "x = bytearray(8 << 30)", "failed", "MemoryError"),
    ("growing memory", "x = []\nwhile True:\n    x.append(bytearray(1 << 24))", "failed", "MemoryError"),
    ("file descriptors", "import os\nfiles = [open(os.__file__) for i in range(200)]", "failed",
     "Too many open files"),
    ("raise a limit", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "failed", "ValueError"),
    ("deep recursion", "def f():\n    f()\nf()", "failed", "RecursionError"),
    # sys.addaudithook drops a hook quietly when an existing hook refuses it (an Exception): it never runs
    ("own audit hook", "import sys\nseen = []\nsys.addaudithook(lambda *a: seen.append(a))\nopen('x', 'w').close()\n"
                       "assert not seen, seen", "passed", ""),
]


@pytest.mark.parametrize("name,program,status,message", CONTAINED, ids=[case[0] for case in CONTAINED])
def test_contained(run, name, program, status, message):
    limit = HANG_S if status == "timeout" else QUICK_S
    result = run(program, timeout_s=limit, memory_mb=256)
    assert result.status == status and message in result.stderr, result
    assert result.seconds < limit + 5


def test_time_limit_counts_cpu_seconds(run):
    """A program that waits longer than its CPU limit, but less than WALL_FACTOR times it, is not stopped: a busy
    machine that slows a correct program down does not fail it."""
    result = run("import time\ntime.sleep(1.5)", timeout_s=HANG_S)
    assert result.passed and 1.5 < result.seconds < sandbox.WALL_FACTOR * HANG_S, result


def test_thread_bomb_stops_at_the_process_limit(run):
    program = ("import resource, threading, time\nprint(resource.getrlimit(resource.RLIMIT_NPROC))\nstarted = 0\n"
               "try:\n    for _ in range(200):\n        threading.Thread(target=time.sleep, args=(30,), daemon=True)"
               ".start()\n        started += 1\nexcept RuntimeError:\n    pass\nprint(started)")
    result = run(program, timeout_s=QUICK_S)
    limit, started = result.stdout.splitlines()
    assert result.passed and limit == f"({sandbox.PROCESSES}, {sandbox.PROCESSES})"
    if os.geteuid() != 0 or sandbox.launcher().user is not None:  # the kernel exempts root's own user id
        assert 0 < int(started) < sandbox.PROCESSES


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_cut(run, stream):
    result = run(f"import sys\nfor _ in range(64):\n    sys.{stream}.write('x' * (1 << 20))", timeout_s=QUICK_S,
                 output_chars=100)
    assert result.status == "failed" and getattr(result, stream) == "x" * 100


def test_big_file_inside_is_cut(run):
    result = run("open('big', 'wb').write(b'0' * (32 << 20))", timeout_s=QUICK_S)
    assert result.status == "failed" and "File too large" in result.stderr


def test_frames_lead_back_to_the_program_only(run):
    program = ("import inspect, sys\nf, names = sys._getframe(), []\nwhile f:\n    names.append(f.f_code.co_name)\n"
               "    f = f.f_back\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
               "    back = e.__traceback__.tb_frame.f_back\nprint(names, back, [s.function for s in inspect.stack()])")
    result = run(program, timeout_s=QUICK_S)
    assert result.passed and result.stdout.strip() == "['<module>'] None ['<module>']"


def test_a_path_that_changes_its_answer_stays_inside(run, place):
    program = ("class P:\n    n = 0\n    def __fspath__(self):\n        P.n += 1\n"
               "        return 'inside' if P.n == 1 else {new!r}\nopen(P(), 'w').write('x')").format(**place)
    assert run(program, timeout_s=QUICK_S).passed  # open asks once; the answer it got is inside
    untouched(place)


def test_environment_holds_no_secret(run, monkeypatch):
    monkeypatch.setenv("DECODERSTACK_FAKE_TOKEN", "hf_fake_secret_123")
    result = run("import os\nprint(sorted(os.environ))\nprint(list(os.environ.values()))", timeout_s=QUICK_S)
    assert result.passed and result.stdout.splitlines()[0] == "['LANG', 'PATH']"
    assert "hf_fake_secret_123" not in result.stdout


def test_stdin_holds_nothing_after_the_guard(run):
    result = run("import os, sys\nassert sys.stdin.read() == '' and os.read(0, 10) == b''", timeout_s=QUICK_S)
    assert result.passed


# What a program may do: work in its own folder, import the standard library, print.
ALLOWED = [
    ("scratch file", "open('scratch.txt', 'w').write('hi')\nassert open('scratch.txt').read() == 'hi'"),
    ("folders inside", "import os, shutil\nos.mkdir('d')\nos.rename('d', 'e')\nshutil.rmtree('e')"),
    ("read a library file", "import os\nassert open(os.__file__).read(10)"),
    ("typing stub", "from typing import List, Tuple\ndef f(x: List[int]) -> Tuple[int, int]:\n"
                    "    return min(x), max(x)\nassert f([3, 1, 2]) == (1, 3)"),
    ("standard library", "import collections, itertools, math, re, heapq, functools, string, hashlib\n"
                         "assert math.gcd(12, 18) == 6"),
    ("threads", "import threading\nt = threading.Thread(target=print, args=('hi',))\nt.start()\nt.join()"),
    ("exceptions caught", "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    print(repr(e))"),
    ("devnull", "open('/dev/null', 'w').write('x')"),
]


@pytest.mark.parametrize("name,program", ALLOWED, ids=[case[0] for case in ALLOWED])
def test_allowed(run, name, program):
    result = run(program, timeout_s=QUICK_S)
    assert result.passed, result


def test_wrong_and_right_humaneval_style_programs(run):
    stub = "def add(a, b):\n"
    tests = "\n\ndef check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n"
    assert run(stub + "    return a + b" + tests, timeout_s=QUICK_S).passed
    assert run(stub + "    return a - b" + tests, timeout_s=QUICK_S).status == "failed"


# --- The operating system's boundary alone: plain programs under each isolating launcher ----------------------

def plain(chosen: sandbox.Launcher, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([*chosen.prefix, sys.executable, "-I", "-S", "-c", code], user=chosen.user,
                          env=sandbox.ENVIRONMENT, cwd="/", capture_output=True, text=True, timeout=20)


ISOLATION = [
    ("root is read-only", "import os\nassert os.statvfs('/').f_flag & os.ST_RDONLY"),
    ("writes outside fail", "import errno\ntry:\n    open({new!r}, 'w')\nexcept OSError as e:\n"
                            "    assert e.errno in (errno.EROFS, errno.EACCES)\nelse:\n    raise SystemExit(1)"),
    ("deletes outside fail", "import os\ntry:\n    os.remove({victim!r})\nexcept OSError:\n    pass\n"
                             "else:\n    raise SystemExit(1)"),
    ("chmod outside fails", "import os\ntry:\n    os.chmod({victim!r}, 0o777)\nexcept OSError:\n    pass\n"
                            "else:\n    raise SystemExit(1)"),
    ("private empty /tmp", "import os\nassert os.getcwd() == '/tmp' and os.listdir('/tmp') == []\n"
                           "open('/tmp/mine', 'w').write('x')"),
    ("no network but lo", "import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']"),
    ("no route to the host", "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                             "except OSError:\n    pass\nelse:\n    raise SystemExit(1)"),
    ("own pid namespace", "import os\nassert os.getpid() < 10"),
    ("no /proc", "import os\nassert os.listdir('/proc') == []"),
    ("parent not visible", "import os\ntry:\n    os.kill({parent}, 0)\nexcept OSError:\n    pass\n"
                           "else:\n    raise SystemExit(1)"),
    ("no capabilities", "import os\ntry:\n    os.chroot('/tmp')\nexcept PermissionError:\n    pass\n"
                        "else:\n    raise SystemExit(1)"),
]


@pytest.mark.parametrize("chosen", ISOLATING or [LAUNCHERS[-1]], ids=[chosen.name for chosen in ISOLATING or LAUNCHERS])
@pytest.mark.parametrize("name,code", ISOLATION, ids=[case[0] for case in ISOLATION])
def test_isolation(place, chosen, name, code):
    if not chosen.isolated:  # nothing isolates on this machine: what is true is that runs say so
        assert sandbox.launcher() == chosen and "no operating-system isolation" in chosen.describe()
        return
    done = plain(chosen, code.format(parent=os.getpid(), **place))
    assert done.returncode == 0, done.stderr
    untouched(place)
    assert not Path("/tmp/mine").exists()


def test_without_isolation_it_says_so(monkeypatch):
    open_launcher = LAUNCHERS[-1]
    assert not open_launcher.isolated and "no operating-system isolation" in open_launcher.describe()
    monkeypatch.setattr(sandbox, "launcher", lambda: open_launcher)
    sandbox.warn_if_open.cache_clear()
    with pytest.warns(RuntimeWarning, match="sandbox: no operating-system isolation on this machine"):
        result = sandbox.run_sandboxed("print('hi')", timeout_s=QUICK_S)
    assert result.passed and not result.isolated
    sandbox.warn_if_open.cache_clear()


def test_isolated_runs_say_so(monkeypatch):
    if not ISOLATING:
        assert not sandbox.launcher().isolated  # the plain launcher, which warns (test above)
        return
    monkeypatch.setattr(sandbox, "launcher", lambda: ISOLATING[0])
    sandbox.warn_if_open.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = sandbox.run_sandboxed("print('hi')", timeout_s=QUICK_S)
    assert result.passed and result.isolated and "namespaces" in ISOLATING[0].describe()
    sandbox.warn_if_open.cache_clear()


def test_launchers_end_with_the_plain_one():
    assert LAUNCHERS[-1].name == "none" and all(chosen.isolated for chosen in LAUNCHERS[:-1])
    assert sandbox.launcher() == LAUNCHERS[0]
