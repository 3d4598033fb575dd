"""The sandbox for untrusted Python: the completions HumanEval runs against its tests (data/chat_eval.py).

The boundary is the operating system's. Each program runs in a separate process, in its own user, network, pid,
mount and IPC namespaces where the machine permits them: no network (only a loopback that is down), the whole file
system read-only apart from a private, empty /tmp that is its working folder, no /proc (so no way into its own
memory or another process's), no capabilities, and the pid namespace ends every process it started when it ends.
Two launchers are tried, once per process (`launchers()`): bubblewrap (`bwrap`) when installed, then `unshare` from
util-linux with a small set-up step (mount_setattr makes every mount read-only, then tmpfs goes over /proc and /tmp).
A probe runs each as the unprivileged user `nobody` (when the caller is root and nobody may run this Python), else
as the caller, and keeps the first that reports a read-only root, a writable /tmp, an empty /proc and no network
interface but `lo`. Colab runs notebooks as root in a container; whether that container grants namespaces is what
the probe finds out there. Where nothing isolates, every evaluation says so before its first program runs (a
RuntimeWarning) and programs run in a temporary folder with the limits and the audit hook below only: that is not a
boundary. A program whose user is root outside its namespaces (a root caller when nobody cannot run this Python)
is not held to the process limit: the kernel exempts root's user id; the audit hook still refuses fork.

Inside, a guard (GUARD) sets resource limits (address space, CPU seconds, file size, open files, processes, no core
dumps), reads the program and a random nonce from its stdin, installs an audit hook, and runs the program. Only
when the program returns normally, its tests included, does the guard write the nonce to a pipe that the harness
owns: that is the verdict. An exit status, a printed "passed" or a replaced file proves nothing, and the program
cannot learn the nonce: it runs in a thread whose frames do not lead back to the guard's, and the hook refuses the
other ways in (other threads' frames, gc, ctypes, /proc where it still exists) and tracing, which could jump over
the tests. The environment holds only PATH and LANG. The harness kills the whole process group at the time limit.

The audit hook is the second layer: it refuses sockets, new processes, signals, ctypes, links, changing folder, hooks
of the program's own, and any write, delete, rename or permission change outside the working folder, including those
through directory or file descriptors; inside, it allows CREATIONS files written or folders made.
"""
from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534  # the unprivileged user a root caller runs programs as
ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
FILE_BYTES = 1 << 24  # largest file (stdout and stderr included) a program may write
OPEN_FILES = 64
CREATIONS = 8  # files opened for writing and folders made, together: the working folder holds at most
# CREATIONS x FILE_BYTES (a tmpfs under bubblewrap sits in memory, past the address-space limit)
WALL_FACTOR = 3  # wall-clock limit over CPU limit (run_sandboxed)
# How a guard stopped at its CPU limit ends: killed by SIGXCPU, directly or under bubblewrap (128 + the signal).
# unshare blocks SIGXCPU in its child, so there the hard limit's SIGKILL ends it and the CPU time used shows it.
CPU_LIMIT_CODES = (-signal.SIGXCPU, 128 + signal.SIGXCPU)
PROCESSES = 16  # RLIMIT_NPROC: threads and processes of the program's user. Programs that run as nobody at the
# same time share them: one that takes them all makes the others fail.

# Run under unshare, before the guard: every mount read-only (mount_setattr, AT_RECURSIVE), an empty read-only
# tmpfs over /proc, a private tmpfs at /tmp as the working folder; then a nested user namespace with no user mapped,
# so that the guard, exec'd last (which drops ctypes with this process image), runs with no capabilities at all.
MOUNT_SETUP = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1  # 442 on x86-64 and arm64
MS_RDONLY, CLONE_NEWUSER = 1, 0x10000000
attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
if (libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr))
        or libc.mount(b"none", b"/proc", b"tmpfs", MS_RDONLY, b"size=4k")
        or libc.mount(b"none", b"/tmp", b"tmpfs", 0, b"size=64m,mode=1777") or libc.unshare(CLONE_NEWUSER)):
    sys.exit(f"sandbox set-up: {os.strerror(ctypes.get_errno())}")
os.chdir("/tmp")
os.execv(sys.argv[1], sys.argv[1:])
"""

PROBE = r"""
import os, socket
isolated = (os.statvfs("/").f_flag & os.ST_RDONLY and not os.statvfs(".").f_flag & os.ST_RDONLY
            and [name for _, name in socket.if_nameindex()] == ["lo"] and not os.listdir("/proc"))
print("isolated" if isolated else "open")
"""

# The guard, run as `python -I -S -B -c GUARD verdict_fd memory_bytes cpu_seconds processes file_bytes open_files
# creations`
# with the nonce and the program on stdin. The program runs in a second thread that C code starts (deque draining
# chain(..., map(exec, ...), iter(finished.release, None))), so its frames lead back to no Python frame of the
# guard's, and `finished` is released only if exec returned. The main thread keeps the nonce in main()'s frame and,
# until the program has run to its end, calls nothing the program could have replaced (every function it needs is
# bound beforehand).
GUARD = r"""
import _thread, collections, itertools, os, resource, sys, time
import typing  # before the limits: HumanEval's stubs import from it


def set_limits(memory, cpu, processes, file_bytes, open_files):
    # CPU: SIGXCPU at the soft limit (the program cannot catch it: only the main thread sets handlers), SIGKILL a
    # second later; the harness reads SIGXCPU as the time limit
    for kind, soft, hard in ((resource.RLIMIT_AS, memory, memory), (resource.RLIMIT_CPU, cpu, cpu + 1),
                             (resource.RLIMIT_NPROC, processes, processes),
                             (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
                             (resource.RLIMIT_NOFILE, open_files, open_files), (resource.RLIMIT_CORE, 0, 0)):
        ceiling = resource.getrlimit(kind)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(kind, (soft, hard))


def read_stdin():
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    return b"".join(chunks)


def make_hook(root, creations):
    stat, lstat, readlink = os.stat, os.lstat, os.readlink  # C functions: replacing os.stat later changes nothing
    created = [0]
    refused = frozenset({
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg",
        "signal.pthread_kill", "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind",
        "socket.getaddrinfo", "socket.sendto", "mmap.__new__", "ctypes.dlopen", "ctypes.dlsym", "os.symlink",
        "os.link", "os.chroot", "os.chdir", "sys._current_frames", "sys.settrace", "sys.setprofile",
        "sys._settraceallthreads", "sys._setprofileallthreads", "sys.monitoring.register_callback", "sys.remote_exec",
        "sys.addaudithook",  # a hook of the program's would run in the guard's thread, whose frame holds the nonce
        "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
    modules = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_testcapi", "_testinternalcapi",
                         "_xxsubinterpreters", "_interpreters"})  # the ways around the events above
    changes = frozenset({"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                         "os.utime", "os.mkfifo", "os.mknod", "os.chflags", "os.lchflags", "os.setxattr",
                         "os.removexattr", "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copytree",
                         "shutil.chown"})
    two_paths = frozenset({"os.rename", "shutil.move", "shutil.copyfile", "shutil.copytree"})
    folder_last = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime", "os.mkfifo",
                             "os.mknod", "shutil.rmtree"})  # events whose last argument is dir_fd (-1: none)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def resolve(path):
        # the real path, links followed with the functions bound above (os.path's can be replaced by the program)
        path = path.decode("utf-8", "surrogateescape") if type(path) is bytes else path
        pending = (path if path.startswith("/") else root + "/" + path).split("/")[::-1]
        done, links = [], 0
        while pending:
            part = pending.pop()
            if part == "..":
                done = done[:-1]
            elif part not in ("", "."):
                try:
                    link = lstat("/" + "/".join([*done, part])).st_mode & 0o170000 == 0o120000 and links < 40
                except (OSError, ValueError):
                    link = False
                if link:
                    links += 1
                    target = readlink("/" + "/".join([*done, part]))
                    done = [] if target.startswith("/") else done
                    pending.extend(target.split("/")[::-1])
                else:
                    done.append(part)
        return "/" + "/".join(done)

    def inside(path):
        if type(path) not in (str, bytes):
            return False  # a descriptor, or an object whose __fspath__ could answer differently the second time
        path = resolve(path)
        return path == root or path.startswith(root + "/") or path == "/dev/null"

    def is_folder(path):
        try:
            return stat(path).st_mode & 0o170000 == 0o040000
        except (OSError, ValueError, TypeError):
            return False

    def count_creation(event):
        created[0] += 1
        if created[0] > creations:
            raise PermissionError(f"sandbox: {event}: more than {creations} files written or folders made")

    def audit(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in modules:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open" and type(args[0]) in (str, bytes):
            path, mode, flags = resolve(args[0]), args[1], args[2]
            writes = (type(mode) is str and any(c in mode for c in "wax+")
                      or type(flags) is int and flags & write_flags)
            if path == "/proc" or path.startswith("/proc/"):
                raise PermissionError(f"sandbox: opening {args[0]!r} is not allowed")
            if not inside(path) and (writes or is_folder(path)):
                raise PermissionError(f"sandbox: opening {args[0]!r} outside the sandbox folder")
            if writes and path != "/dev/null":
                count_creation("open")
        elif event == "open" and args[0] is not None and type(args[0]) is not int:
            raise PermissionError(f"sandbox: open takes a str path here, not {type(args[0]).__name__}")
        if event in changes:
            paths = args[:2] if event in two_paths else args[:1]
            folders = args[2:4] if event == "os.rename" else args[-1:] if event in folder_last else ()
            if not all(inside(path) for path in paths) or any(folder not in (None, -1) for folder in folders):
                raise PermissionError(f"sandbox: {event} outside the sandbox folder")
            if event in ("os.mkdir", "os.mkfifo", "os.mknod"):
                count_creation(event)

    return audit


def main():
    verdict, memory, cpu, processes, file_bytes, open_files, creations = map(int, sys.argv[1:8])
    set_limits(memory, cpu, processes, file_bytes, open_files)
    nonce, _, source = read_stdin().partition(b"\n")
    del sys.argv[1:]
    for name in set(os.environ) - {"PATH", "LANG"}:  # bubblewrap sets PWD
        del os.environ[name]
    code = compile(source, "program.py", "exec")
    started, finished = _thread.allocate_lock(), _thread.allocate_lock()
    started.acquire()
    finished.acquire()
    ended, threads, pause, write, leave = finished.acquire, _thread._count, time.sleep, os.write, os._exit
    anything = BaseException
    flushes = sys.stdout.flush, sys.stderr.flush  # the real streams', whatever the program puts in sys.stdout
    sys.addaudithook(make_hook(os.getcwd(), creations))
    steps = itertools.chain(iter(started.release, None), map(exec, (code,), ({"__name__": "__main__"},)),
                            iter(finished.release, None))
    _thread.start_new_thread(collections.deque, (steps, 0))
    try:
        started.acquire()  # from here on the thread counts in threads() until it ends
        # polled: an acquire with a timeout can take the lock and still report a time-out (seen under load)
        while not ended(False):
            if threads() == 0:  # ended, or stopped: the last step releases the lock before the thread ends
                if ended(False):
                    break
                for flush in flushes:
                    flush()
                write(2, b"sandbox: the program stopped before its end (an exception or an exit)\n")
                leave(3)
            pause(0.01)
        write(verdict, nonce)
        for flush in flushes:
            flush()
    except anything:
        leave(3)
    leave(0)  # not waiting for threads the program left behind


main()
"""


class SandboxError(RuntimeError):
    """The sandbox itself could not run a program (not a failure of the program)."""


@dataclass(frozen=True)
class Launcher:
    """How programs start on this machine: `prefix` before the guard's command, as `user` (None: the caller)."""
    name: str  # bubblewrap | unshare | none
    prefix: tuple[str, ...]
    user: int | None

    @property
    def isolated(self) -> bool:
        return bool(self.prefix)

    def describe(self) -> str:
        who = "the caller's user" if self.user is None else f"user {self.user}"
        if not self.isolated:
            return (f"no operating-system isolation on this machine (no bwrap, or namespaces not permitted): "
                    f"programs run as {who} with resource limits and an audit hook only, which is not a boundary")
        return (f"{self.name}: own user, network, pid, mount and IPC namespaces, read-only file system, "
                f"private /tmp, as {who}")


@dataclass
class SandboxResult:
    status: str  # passed (the guard's nonce came back: the program and its tests ran to the end) | failed | timeout
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolated: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def isolation_prefixes() -> list[tuple[str, tuple[str, ...]]]:
    """The launchers this machine has, in order of preference."""
    found = []
    if shutil.which("bwrap"):
        found.append(("bubblewrap", ("bwrap", "--unshare-all", "--cap-drop", "ALL", "--die-with-parent",
                                     "--new-session", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--tmpfs", "/proc",
                                     "--dev", "/dev", "--chdir", "/tmp", "--")))
    if shutil.which("unshare"):
        found.append(("unshare", ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork",
                                  "--kill-child", "--mount", "--ipc", "--", sys.executable, "-I", "-S", "-B", "-c",
                                  MOUNT_SETUP)))
    return found


def probe(prefix: tuple[str, ...], user: int | None) -> str:
    """What PROBE prints under this launcher: "isolated", "open", or "" when it does not run at all."""
    try:
        done = subprocess.run([*prefix, sys.executable, "-I", "-S", "-B", "-c", PROBE], env=ENVIRONMENT, cwd="/",
                              user=user, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


@lru_cache(maxsize=1)
def launchers() -> tuple[Launcher, ...]:
    """Every launcher that works on this machine, the isolating ones first, the plain one last; each under the
    first user it works as (nobody before the caller, when the caller is root). Probed once per process."""
    users = [NOBODY, None] if os.geteuid() == 0 else [None]
    found = []
    for name, prefix in [*isolation_prefixes(), ("none", ())]:
        user = next((user for user in users if probe(prefix, user) == ("isolated" if prefix else "open")), -1)
        if user != -1:
            found.append(Launcher(name, prefix, user))
    if not found or found[-1].isolated:
        raise SandboxError(f"{sys.executable} does not run with an empty environment here: no sandbox is possible")
    return tuple(found)


def launcher() -> Launcher:
    """The launcher programs run with: the first of launchers()."""
    return launchers()[0]


@lru_cache(maxsize=1)
def warn_if_open() -> None:
    """Say once, before the first program runs, that nothing isolates it."""
    chosen = launcher()
    if not chosen.isolated:
        warnings.warn(f"sandbox: {chosen.describe()}", RuntimeWarning, stacklevel=3)


def read_tail(path: Path, chars: int) -> str:
    """The last `chars` characters of a file, reading no more than its last 4 x `chars` bytes."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * chars))
        return f.read().decode("utf-8", errors="replace")[-chars:]


def run_sandboxed(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, output_chars: int = 4000
                  ) -> SandboxResult:
    """Run a Python program in the sandbox described above; the last `output_chars` of its stdout and stderr.

    The time limit counts the program's CPU seconds (whole seconds, at least one), so a busy machine does not fail a
    correct program; a program that sleeps or waits instead is stopped at WALL_FACTOR times `timeout_s`."""
    warn_if_open()
    chosen = launcher()
    nonce = secrets.token_hex(16).encode()
    limits = (memory_mb << 20, max(1, math.ceil(timeout_s)), PROCESSES, FILE_BYTES, OPEN_FILES, CREATIONS)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="decoderstack_sandbox_") as folder:
        work = Path(folder, "work")  # the working folder when nothing isolates; the outputs stay outside it
        work.mkdir()
        if chosen.user is not None:
            os.chown(work, chosen.user, chosen.user)
        verdict_read, verdict_write = os.pipe()
        try:
            with open(Path(folder, "stdout"), "wb") as out, open(Path(folder, "stderr"), "wb") as err:
                try:
                    process = subprocess.Popen(
                        [*chosen.prefix, sys.executable, "-I", "-S", "-B", "-c", GUARD, str(verdict_write),
                         *map(str, limits)], cwd=work, env=ENVIRONMENT, user=chosen.user, stdin=subprocess.PIPE,
                        stdout=out, stderr=err, pass_fds=(verdict_write,), start_new_session=True)
                finally:
                    os.close(verdict_write)  # the program's copy is the only one left: no stray writer from here
                stdin = nonce + b"\n" + program.encode("utf-8", "surrogatepass")
                returncode, finished, cpu_s = run_to_end(process, stdin, WALL_FACTOR * timeout_s)
            verdict = read_available(verdict_read, len(nonce) + 1)
        finally:
            os.close(verdict_read)
        out_of_time = not finished or cpu_s >= limits[1] or returncode in CPU_LIMIT_CODES
        status = "passed" if verdict == nonce else "timeout" if out_of_time else "failed"
        return SandboxResult(status, returncode, read_tail(Path(folder, "stdout"), output_chars),
                             read_tail(Path(folder, "stderr"), output_chars), time.time() - started, chosen.isolated)


def run_to_end(process: subprocess.Popen, stdin: bytes, timeout_s: float) -> tuple[int, bool, float]:
    """Feed the guard its stdin, wait up to `timeout_s`, then kill the whole process group whatever happened (so a
    program's leftover processes die with it); (return code, whether it ended before the time limit, CPU seconds
    that it and the descendants it waited for used: the launchers wait for the guard)."""
    threading.Thread(target=feed, args=(process.stdin, stdin), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not (ended := os.wait4(process.pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.005)  # os.wait4 has no timeout; Popen.wait polls the same way
    finished = bool(ended[0])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # before reaping: the group id cannot have been reused yet
    _, status, usage = ended if finished else os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, finished, usage.ru_utime + usage.ru_stime


def feed(pipe, data: bytes) -> None:
    """Write `data` to a pipe and close it; a reader that died first (a launcher that failed) is not an error."""
    with contextlib.suppress(BrokenPipeError, OSError):
        with pipe:
            pipe.write(data)


def read_available(fd: int, size: int) -> bytes:
    """What a pipe holds now, up to `size` bytes, without waiting for a writer that may still hold it open."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return b""
