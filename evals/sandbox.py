"""
Run model-generated Python (HumanEval completions, RL rewards) where it cannot hurt us: every program
is a fresh `python -I` subprocess in its own temporary directory, never code run in this process, and
what happened comes back as a Result with a one-line reason.

What holds a program in, most of it only as root (the dev, CI and GPU machines run as root):
- resource limits set between fork and exec: address space, CPU seconds, file size, process count,
  no core files; plus a wall-clock timeout that SIGKILLs the whole process group;
- a clean environment (none of our variables, so none of our secrets), stdin at EOF, output capped;
- a network namespace: it has only a loopback interface, and that is down, so nothing is reachable;
- a mount namespace: fresh empty /tmp, /var/tmp, /dev/shm; directories other users may not enter
  (/root, when Python lives in /root/.pyenv) are replaced by empty ones holding just the Python tree;
- a pid namespace with the program as its pid 1: it sees only its own processes (not us: no
  /proc/<our pid>/environ, nothing to kill) and when it ends the kernel kills all it left behind;
- an unused unprivileged uid of its own, owning nothing but the temporary directory.
Not root, a user namespace still gives the network namespace, but files and processes stay ours.
Result.isolation says which of these were in force; nothing is claimed that was not.
"""
import ctypes
import grp
import math
import os
import pwd
import re
import resource
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache


@dataclass
class Result:
    passed: bool  # the program exited 0 within every limit
    status: str  # passed | failed | timeout | memory | output_limit | killed | error (could not start)
    reason: str  # one line for a person, e.g. "AssertionError at line 12"
    stdout: str  # captured, cut at max_output bytes
    stderr: str
    returncode: int | None  # negative: killed by that signal; None: never started
    isolation: dict  # what was in force: network, user, uid, filesystem, processes, limits

    @property
    def isolated(self) -> bool:
        """Both a network namespace and an unprivileged user were in force."""
        return self.isolation.get("network") == "namespace" and self.isolation.get("user") == "unprivileged"


# -----------------------------------------------------------------------------
# libc calls the os module lacks (os.unshare is new in Python 3.12; mount, prctl and a bare fork never)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_libc.signal.argtypes, _libc.signal.restype = (ctypes.c_int, ctypes.c_void_p), ctypes.c_void_p
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG = 1


def _check(ret, what):
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _unshare(flags):
    if hasattr(os, "unshare"):
        os.unshare(flags)
    else:
        _check(_libc.unshare(flags), "unshare")


def _mount(source, target, fstype, flags, options=None):
    def enc(s):
        return None if s is None else s.encode()
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(options)), f"mount {target}")


def _die_with_parent():
    """SIGKILL us when the thread that started us dies (setuid clears this, so call it after)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# -----------------------------------------------------------------------------
# Sandbox users. RLIMIT_NPROC counts every process of the real uid, not of one sandbox: with one
# shared user (say nobody), eight sandboxes from run_programs and a fork bomb in one of them would
# share its 16 slots, and the others could not fork or even start (after setuid the kernel refuses
# execve to a user over the limit); any daemon that runs as nobody would count as well. So each
# running sandbox gets a uid of its own from SANDBOX_UIDS: the limit is per sandbox, and sandboxes
# cannot signal or read one another. The price: a range of uids that no account may use (checked
# against the passwd and group databases) and a claim on one for the duration of a run.

SANDBOX_UIDS = range(60000, 60512)


@cache
def _unused_uids():
    taken = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    return [uid for uid in SANDBOX_UIDS if uid not in taken]


def _claim_uid():
    """A uid no other sandbox is using, in this process or any other: held by binding an abstract unix
    socket named after it, which the kernel releases when the socket closes or its process dies."""
    for uid in _unused_uids():
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            claim.bind(f"\0nanochat_jax.sandbox.uid.{uid}")
            return uid, claim
        except OSError:
            claim.close()
    raise RuntimeError(f"every sandbox uid in {SANDBOX_UIDS} is in use")


# -----------------------------------------------------------------------------
# The private filesystem view (root only): what to cover with an empty tmpfs and what to bind back.

PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # writable by everyone: each gets a fresh tmpfs


def _closed_above(path):
    """The highest directory above `path` that other users may not enter, or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


@cache
def _python_dirs():
    """The interpreter's own trees, which the sandbox user must be able to read."""
    dirs = {os.path.realpath(d) for d in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                          os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable)))}
    return sorted(d for d in dirs if not any(d.startswith(other + "/") for other in dirs))


def _inside(path, dirs):
    return any(path.startswith(d + "/") for d in dirs)


def _layout(workdir, max_file_mb):
    """[(directory, tmpfs options)] to cover, and the directories under them to bind back in place."""
    covers = {}
    for d in dict.fromkeys(os.path.realpath(d) for d in PRIVATE_DIRS):
        if os.path.isdir(d) and os.stat(d).st_mode & stat.S_IWOTH:
            covers[d] = f"mode=1777,size={max(1, max_file_mb)}m"
    keeps = _python_dirs() + [workdir]
    for k in keeps:
        closed = _closed_above(k)
        if closed:  # nothing under it was visible to others anyway: an empty tmpfs loses nothing
            covers.setdefault(closed, "mode=0755,size=1m")
    covers = {d: o for d, o in covers.items() if not _inside(d, covers)}
    return list(covers.items()), [k for k in keeps if _inside(k, covers)]


def _private_mounts(covers, keeps):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in keeps]  # a handle on each before it is covered
    for d, options in covers:
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for k, fd in zip(keeps, fds):
        os.makedirs(k, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
        os.close(fd)


# -----------------------------------------------------------------------------
# Plans: how much isolation to ask for, most first. The first one that runs `pass` is kept for the
# process (a container may refuse namespaces or mounts); later failures are errors, not downgrades.
# Without the pid namespace only killpg is left, so a daemon that called setsid() can outlive its run
# (RLIMIT_CPU still ends it if it computes) and its uid may be handed out again: Result.isolation
# then says "processes": "process group".

@dataclass(frozen=True)
class _Plan:
    netns: bool = False  # new network namespace
    private: bool = False  # new mount + pid namespaces (root only)
    drop: bool = False  # run as a claimed sandbox uid (root only)
    userns: bool = False  # not root: a user namespace mapping our own uid, to be allowed the netns


def _candidates():
    if os.geteuid() != 0:
        return [_Plan(netns=True, userns=True), _Plan()]
    plans = [_Plan(netns=True, private=True, drop=True), _Plan(netns=True, drop=True), _Plan(drop=True), _Plan()]
    if any(_closed_above(d) for d in _python_dirs()):  # only the private view lets another user reach Python
        plans = [p for p in plans if p.private or not p.drop]
    return plans


_chosen = None
_choose_lock = threading.Lock()


def _plan():
    global _chosen
    with _choose_lock:
        if _chosen is None:
            for plan in _candidates():
                if _run("pass", plan, timeout=10.0).passed:
                    break
            _chosen = plan  # the last (no isolation) if nothing ran: its runs then report the error
    return _chosen


def _limits(timeout, memory_mb, max_processes, max_file_mb):
    """[(resource, soft, hard)], never above our own hard limits (a nested sandbox cannot raise them)."""
    cpu = math.ceil(timeout) + 1  # the wall clock fires first; this stops CPU burnt in threads or past a missed kill
    mib = 1 << 20
    wanted = [(resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_FSIZE, max_file_mb * mib, max_file_mb * mib),
              (resource.RLIMIT_NPROC, max_processes, max_processes),
              (resource.RLIMIT_CPU, cpu, cpu + 1),
              (resource.RLIMIT_AS, memory_mb * mib, memory_mb * mib)]  # last: the child must not allocate after it
    limits = []
    for res, soft, hard in wanted:
        ceiling = resource.getrlimit(res)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        limits.append((res, soft, hard))
    return limits


def _describe(plan, uid, limits):
    names = {resource.RLIMIT_AS: "AS", resource.RLIMIT_CPU: "CPU", resource.RLIMIT_FSIZE: "FSIZE",
             resource.RLIMIT_NPROC: "NPROC", resource.RLIMIT_CORE: "CORE"}
    units = {"AS": lambda v: f"{v >> 20} MiB", "FSIZE": lambda v: f"{v >> 20} MiB", "CPU": lambda v: f"{v} s"}
    described = [f"{names[r]} {units.get(names[r], str)(soft)}" for r, soft, _ in limits]
    if uid == 0:
        described = [d + " (not enforced for root)" if d.startswith("NPROC") else d for d in described]
    return {"network": "namespace" if plan.netns else "none",
            "user": "unprivileged" if plan.drop else "same",
            "uid": uid,
            "filesystem": "private /tmp, /var/tmp, /dev/shm; closed directories hidden" if plan.private else "shared",
            "processes": "pid namespace" if plan.private else "process group",
            "limits": described}


# -----------------------------------------------------------------------------
# The child side: runs in the forked child between fork and exec (Popen's preexec_fn). Only syscalls
# and prepared values here: the parent may have other threads, whose locks are frozen in the fork.

def _child(plan, uid, workdir, covers, keeps, limits, report_fd):
    def setup():
        if plan.userns:
            uid_, gid_ = os.getuid(), os.getgid()
            _unshare(CLONE_NEWUSER | CLONE_NEWNET)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid_} {uid_} 1"), ("gid_map", f"{gid_} {gid_} 1")):
                fd = os.open(f"/proc/self/{name}", os.O_WRONLY)  # map our uid, else files could not be created
                os.write(fd, text.encode())
                os.close(fd)
        elif plan.netns or plan.private:
            _unshare((CLONE_NEWNET if plan.netns else 0) | (CLONE_NEWNS | CLONE_NEWPID if plan.private else 0))
        if plan.private:
            _private_mounts(covers, keeps)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            # A new pid namespace takes only children: fork, and the child (pid 1 there) becomes the program.
            # A bare libc fork: os.fork would run the parent's at-fork hooks (JAX's warns) in here.
            pid = _check(_libc.fork(), "fork")
            if pid:
                try:
                    os.write(report_fd, pid.to_bytes(4, "little"))  # the parent kills the program by this pid
                    _wait_and_exit_alike(pid)
                finally:
                    os._exit(255)  # never return: Popen would exec the program here, as root
            os.close(report_fd)
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this namespace's processes only
            os.chdir(workdir)  # through the bind mount
        if plan.drop:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # root, so real, effective and saved: for good
        _die_with_parent()
        for res, soft, hard in limits:
            resource.setrlimit(res, (soft, hard))
    return setup


def _wait_and_exit_alike(pid):
    """The outer half of the pid-namespace fork: holds no file open (Popen's exec-error pipe, our output
    pipes and other sandboxes' pipes would not reach EOF), waits, and ends as the program did. The
    program, pid 1 of the namespace, ends only once every process in the namespace is gone."""
    _die_with_parent()
    os.closerange(0, os.sysconf("SC_OPEN_MAX"))
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code < 0:
        _libc.signal(-code, None)  # SIG_DFL, so the same signal ends us the same way
        os.kill(os.getpid(), -code)
        os._exit(128 - code)
    os._exit(code)


# -----------------------------------------------------------------------------
# The parent side: start, read, stop, classify.

def run_program(code: str, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 65536,
                max_processes: int = 16, max_file_mb: int = 16) -> Result:
    """Run the Python source `code` in a sandbox; see the module docstring for what contains it."""
    return _run(code, _plan(), timeout, memory_mb, max_output, max_processes, max_file_mb)


def run_programs(programs: list[str], workers: int | None = None, **limits) -> list[Result]:
    """run_program on each, `workers` at a time (threads that each drive one subprocess), in input order."""
    programs = list(programs)
    workers = workers or max(1, min(len(programs), os.cpu_count() or 1))
    _plan()  # probe before the threads start
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda code: run_program(code, **limits), programs))


def _run(code, plan, timeout=5.0, memory_mb=512, max_output=65536, max_processes=16, max_file_mb=16):
    limits = _limits(timeout, memory_mb, max_processes, max_file_mb)
    try:
        uid, claim = _claim_uid() if plan.drop else (os.getuid(), None)
    except RuntimeError as e:
        return Result(False, "error", f"could not start: {e}", "", "", None, _describe(plan, None, limits))
    isolation = _describe(plan, uid, limits)
    workdir = tempfile.mkdtemp(prefix="nanochat_sandbox_")
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        if plan.drop:  # the only place the sandbox user may write
            os.chown(program, uid, uid)
            os.chown(workdir, uid, uid)
        try:
            proc, program_pid = _start(plan, uid, workdir, program, limits, max_file_mb)
        except (OSError, subprocess.SubprocessError) as e:
            return Result(False, "error", f"could not start: {e}", "", "", None, isolation)
        with proc:
            stdout, stderr, cut = _collect(proc, program_pid, timeout, max_output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # every process of the run is dead by now
        if claim:
            claim.close()
    status, reason = _classify(cut, proc.returncode, stderr, program, timeout, memory_mb, max_output, max_file_mb)
    return Result(status == "passed", status, reason, stdout, stderr, proc.returncode, isolation)


def _start(plan, uid, workdir, program, limits, max_file_mb):
    """Popen the program. With a pid namespace, also its pid as we see it, which the intermediate
    writes to a pipe (the program's own getpid() says 1)."""
    covers, keeps = _layout(workdir, max_file_mb) if plan.private else ([], [])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    # With a preexec_fn, Popen runs our at-fork hooks: once JAX is up, its hook warns (once) that fork and
    # threads may deadlock. Not here: the child makes only syscalls before exec.
    report_r, report_w = os.pipe() if plan.private else (None, None)
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-X", "utf8", program], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, umask=0o022, pass_fds=(report_w,) if plan.private else (),
                                preexec_fn=_child(plan, uid, workdir, covers, keeps, limits, report_w))
        if not plan.private:
            return proc, None
        os.close(report_w)
        report_w = None
        return proc, int.from_bytes(os.read(report_r, 4), "little") or None
    finally:
        for fd in (report_r, report_w):
            if fd is not None:
                os.close(fd)


def _exited(pid):
    """Has our child `pid` exited? Without reaping it, so its pid (and pgid) stays ours."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_program(parent, pid):
    """SIGKILL `pid` if it is still the child of `parent`: the pidfd pins the process that was checked."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with open(f"/proc/{pid}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _stop(proc, program_pid):
    """Kill whatever is left, then reap. With a pid namespace, kill the program: it is the namespace's
    init, so the kernel kills the rest, and the intermediate exits once all of it is gone (killing the
    intermediate first would return while they are still dying). Then killpg, which is all there is
    without a pid namespace. The leader is reaped last, so its pgid cannot have gone to someone else."""
    if program_pid and not _exited(proc.pid):
        _kill_program(proc.pid, program_pid)
        deadline = time.monotonic() + 2.0
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.001)
    _kill_group(proc.pid)
    proc.wait()


def _collect(proc, program_pid, timeout, max_output):
    """Read stdout and stderr until the program exits, writes more than max_output bytes to one of
    them, or outlives `timeout`; then stop everything. Returns (stdout, stderr, cut): cut is None,
    "timeout", "stdout" or "stderr"."""
    deadline = time.monotonic() + timeout
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    names = dict(zip(bufs, ("stdout", "stderr")))
    cut, exited = None, False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        try:
            pidfd = os.pidfd_open(proc.pid)  # readable once it exits: a wake-up without polling
            sel.register(pidfd, selectors.EVENT_READ)
        except OSError:  # kernel older than 5.3
            pidfd = None
        try:
            while cut is None:
                if not exited and _exited(proc.pid):
                    exited = True
                    _kill_group(proc.pid)  # anything it left running goes too, and lets go of the pipes
                    deadline = min(deadline, time.monotonic() + 0.5)  # to drain what they hold
                    if pidfd is not None:
                        sel.unregister(pidfd)
                reading = [key.fd for key in sel.get_map().values() if key.fd in bufs]
                left = deadline - time.monotonic()
                if exited and (not reading or left <= 0):
                    break
                if left <= 0:
                    cut = "timeout"
                    break
                for key, _ in sel.select(left if pidfd is not None else min(left, 0.02)):
                    if key.fd not in bufs:
                        continue
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fd)
                        continue
                    buf = bufs[key.fd]
                    buf += data
                    if len(buf) > max_output:
                        del buf[max_output:]
                        cut = names[key.fd]
                        break
        finally:
            _stop(proc, program_pid)
            if pidfd is not None:
                os.close(pidfd)
    out, err = (bytes(b).decode("utf-8", errors="replace") for b in bufs.values())
    return out, err, cut


def _classify(cut, rc, stderr, program, timeout, memory_mb, max_output, max_file_mb):
    if cut == "timeout":
        return "timeout", f"wall-clock timeout after {timeout:.1f} s (process group killed)"
    if cut:
        return "output_limit", f"{cut} exceeded {max_output} bytes (process group killed)"
    if rc == 0:
        return "passed", "exit status 0"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1][:300] if lines else ""
    lineno = re.findall(rf'File "{re.escape(program)}", line (\d+)', stderr)
    at = f" at line {lineno[-1]}" if lineno else ""
    if last.startswith("MemoryError") or "[Errno 12]" in last:  # ENOMEM: the address-space limit
        return "memory", f"MemoryError: address-space limit {memory_mb} MiB{at}"
    if rc == -signal.SIGXCPU:
        return "timeout", f"CPU-time limit {math.ceil(timeout) + 1} s exceeded (SIGXCPU)"
    if "[Errno 27]" in last or rc == -signal.SIGXFSZ:  # EFBIG (Python ignores SIGXFSZ, so writes fail)
        return "output_limit", f"file-size limit {max_file_mb} MiB{at}"
    if rc < 0:
        try:
            return "killed", f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return "killed", f"killed by signal {-rc}"
    return "failed", f"{last}{at}" if last else f"exit status {rc}"
