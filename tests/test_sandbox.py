"""The sandbox for generated code: ordinary programs give their result; hostile ones are stopped with a
reason, and the host (our files, our process, our environment, the machine) is as it was. Protections
that need root are asserted as root (CI and dev machines); otherwise the Result must report them
missing, and a program that would do harm without them is not run."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from types import SimpleNamespace

import pytest

from evals import sandbox
from evals.sandbox import run_program, run_programs

ROOT = os.geteuid() == 0
SECRET = "hunter2-sandbox-test-secret"

# Hostile programs start with this and end with done(): a JSON line saying what each attempt did.
PRELUDE = '''\
import json, os, signal, socket, subprocess, sys, time
report = {"cwd": os.getcwd(), "pgid": os.getpgid(0), "uid": os.getuid()}
def attempt(name, fn):
    try:
        value = fn()
        report[name] = "ok" if value is None else value
    except BaseException as e:
        report[name] = type(e).__name__
def done():
    print(json.dumps(report), flush=True)
'''


def program(body, **values):
    """PRELUDE, `name = value` for each value, then the dedented body."""
    return PRELUDE + "".join(f"{k} = {v!r}\n" for k, v in values.items()) + textwrap.dedent(body)


def report_of(result):
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, (result.status, result.reason, result.stderr[-2000:])
    return json.loads(lines[-1])


def live_processes(uid=None, pgid=None):
    """Pids of the processes (zombies aside) with that real uid and/or process group."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            with open(f"/proc/{pid}/status") as f:
                real_uid = int(re.search(r"^Uid:\s+(\d+)", f.read(), re.M).group(1))
        except (OSError, AttributeError):
            continue  # gone meanwhile
        if state != "Z" and uid in (None, real_uid) and pgid in (None, int(pgrp)):
            found.append(int(pid))
    return found


def assert_host_unharmed(result, report):
    assert result.reason
    assert not os.path.exists(report["cwd"]), "the temporary directory must be removed"
    if result.isolation["user"] == "unprivileged":
        assert live_processes(uid=result.isolation["uid"]) == []
    if report["pgid"]:  # 0 inside a pid namespace, where the group is not visible
        assert live_processes(pgid=report["pgid"]) == []
    assert subprocess.run(["true"]).returncode == 0  # we can still start processes


@pytest.fixture(scope="module")
def isolation():
    return run_program("pass").isolation


@pytest.fixture
def host_files(request, tmp_path):
    """A directory of ours the sandbox may look into but not write: a sentinel and a 0600 secret. In
    pytest's cache dir (in the checkout), as the sandbox sees the host's /tmp not at all."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: tmp_path then
    root = tempfile.mkdtemp(prefix="host_", dir=cache.mkdir("sandbox") if cache else tmp_path)
    os.chmod(root, 0o755)
    files = SimpleNamespace(dir=root, sentinel=os.path.join(root, "sentinel.txt"), secret=os.path.join(root, "secret.txt"))
    for path, text, mode in ((files.sentinel, "untouched", 0o644), (files.secret, SECRET, 0o600)):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
    files.before = os.stat(files.sentinel)
    yield files
    shutil.rmtree(root)


def assert_sentinel_untouched(files):
    after = os.stat(files.sentinel)
    assert (after.st_mtime_ns, after.st_size, after.st_mode) == (files.before.st_mtime_ns, files.before.st_size, files.before.st_mode)
    with open(files.sentinel) as f:
        assert f.read() == "untouched"
    assert sorted(os.listdir(files.dir)) == ["secret.txt", "sentinel.txt"]


# -----------------------------------------------------------------------------
# Ordinary programs

def test_passing_program_returns_its_output():
    result = run_program("import math\nprint('hello', math.factorial(5))\nprint('to stderr', file=__import__('sys').stderr)")
    assert (result.passed, result.status, result.returncode) == (True, "passed", 0)
    assert result.stdout == "hello 120\n" and result.stderr == "to stderr\n"


@pytest.mark.parametrize("code, status, reason", [
    ("x = 1\n\nassert x == 2\n", "failed", "AssertionError at line 3"),
    ("def f():\n    raise ValueError('bad input')\nf()\n", "failed", "ValueError: bad input at line 2"),  # the innermost line of the program
    ("def f(:\n    pass\n", "failed", "SyntaxError: invalid syntax at line 1"),
    ("import sys\nsys.exit(3)\n", "failed", "exit status 3"),
    ("input()\n", "failed", "EOFError: EOF when reading a line at line 1"),  # stdin is empty
])
def test_failures_say_why_and_where(code, status, reason):
    result = run_program(code)
    assert (result.passed, result.status, result.reason) == (False, status, reason)
    assert result.returncode != 0


def test_run_programs_runs_in_parallel_and_keeps_input_order():
    """Up to `workers` programs run at once (their sleeps overlap: counted from the times they report, not
    from the wall clock of a machine that may be busy), and the results come back in input order."""
    programs = [f"import time\nstart = time.time()\ntime.sleep({0.2 + (20 - i) * 0.02})\nprint({i}, start, time.time())"
                for i in range(20)]  # later ones finish first
    programs[7] = "assert False"
    results = run_programs(programs, workers=4)
    assert [r.stdout.split(" ")[0] for r in results] == [str(i) if i != 7 else "" for i in range(20)]
    assert [r.passed for r in results] == [i != 7 for i in range(20)]
    spans = [tuple(map(float, r.stdout.split()[1:])) for r in results if r.passed]
    at_once = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    assert 2 <= at_once <= 4, spans
    assert run_programs([]) == []


def test_environment_is_clean_and_limits_are_in_force(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SANDBOX_TEST_SECRET", SECRET)
    result = run_program(program('''
        import resource
        report["environ"] = dict(os.environ)
        report["isolated_mode"] = sys.flags.isolated
        report["limits"] = {name: resource.getrlimit(getattr(resource, "RLIMIT_" + name)) for name in ("AS", "CPU", "FSIZE", "NPROC", "CORE")}
        done()
    '''), timeout=2.0, memory_mb=300, max_processes=12, max_file_mb=3)
    report = report_of(result)
    assert result.passed and SECRET not in result.stdout
    assert report["environ"] == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": report["cwd"], "TMPDIR": report["cwd"], "LANG": "C.UTF-8"}
    assert report["isolated_mode"] == 1
    assert report["limits"] == {"AS": [300 << 20] * 2, "CPU": [3, 4], "FSIZE": [3 << 20] * 2, "NPROC": [12, 12], "CORE": [0, 0]}
    assert result.isolation["limits"] == ["CORE 0", "FSIZE 3 MiB", "NPROC 12", "CPU 3 s", "AS 300 MiB"]
    assert_host_unharmed(result, report)


def test_as_root_every_layer_is_in_force(isolation):
    if not ROOT:
        assert isolation["user"] == "same" and not run_program("pass").isolated  # nothing claimed that is not there
        return
    assert isolation == {"network": "namespace", "user": "unprivileged", "uid": isolation["uid"],
                         "filesystem": "private /tmp, /var/tmp, /dev/shm; closed directories hidden",
                         "processes": "pid namespace", "limits": ["CORE 0", "FSIZE 16 MiB", "NPROC 16", "CPU 6 s", "AS 512 MiB"]}
    assert isolation["uid"] in sandbox.SANDBOX_UIDS
    result = run_program(program('''
        report["pid"], report["ppid"], report["gid"], report["groups"] = os.getpid(), os.getppid(), os.getgid(), os.getgroups()
        report["owner"] = os.stat(".").st_uid
        done()
    '''))
    report = report_of(result)
    assert result.isolated
    assert (report["pid"], report["ppid"]) == (1, 0)  # pid 1 of its own namespace: we are not in it
    assert report["uid"] == report["gid"] == report["owner"] == result.isolation["uid"] and report["groups"] == []


def test_without_root_the_sandbox_reports_what_is_missing(isolation):
    """The module run as an unprivileged user (inside a sandbox) must not claim isolation it lacks."""
    if not ROOT:
        assert not run_program("pass").isolated
        return
    with open(sandbox.__file__) as f:
        source = f.read()
    result = run_program(source + textwrap.dedent('''
        import json
        inner = run_program("import os; print(os.getuid())", timeout=3.0)
        print(json.dumps({"status": inner.status, "stdout": inner.stdout, "isolation": inner.isolation, "isolated": inner.isolated}))
    '''), timeout=10.0)
    assert result.passed, result.stderr[-2000:]
    inner = json.loads(result.stdout.splitlines()[-1])
    assert inner["status"] == "passed" and inner["stdout"] == f"{result.isolation['uid']}\n"
    assert inner["isolation"]["user"] == "same" and inner["isolation"]["processes"] == "process group"
    assert inner["isolated"] is False


# -----------------------------------------------------------------------------
# Hostile programs: each one contained, with a reason, and the host unharmed

def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_program(program("done()\nwhile True:\n    pass\n"), timeout=1.0)
    assert 1.0 <= time.monotonic() - start < 1.0 + 10  # not ended early; killed, not left running (slack: a busy CI machine)
    assert (result.passed, result.status, result.reason) == (False, "timeout", "wall-clock timeout after 1.0 s (process group killed)")
    assert result.returncode == -9
    assert_host_unharmed(result, report_of(result))


def test_timeout_kills_children_and_escaped_daemons(isolation):
    daemon = isolation["processes"] == "pid namespace"  # without one (not root) a setsid daemon would escape killpg
    assert daemon or not ROOT
    result = run_program(program('''
        subprocess.Popen(["sleep", "60"])
        os.system("sleep 60 &")
        if daemon and os.fork() == 0:  # a new session: out of the process group that killpg reaches
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
        done()
        time.sleep(60)
    ''', daemon=daemon), timeout=1.5)
    assert result.status == "timeout"
    assert_host_unharmed(result, report_of(result))


@pytest.mark.parametrize("code", [
    "while True:\n    os.fork()\n",  # dies of its own BlockingIOError once NPROC is full
    "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",  # keeps trying: the timeout ends it
])
def test_fork_bomb_is_contained(code):
    start = time.monotonic()
    result = run_program(program("done()\n" + code), timeout=1.5)
    assert time.monotonic() - start < 1.5 + 10  # the whole group is killed at the timeout, not waited for
    assert not result.passed and result.status in ("failed", "timeout")
    assert "BlockingIOError" in result.reason or result.status == "timeout"
    assert_host_unharmed(result, report_of(result))


def test_fork_bomb_does_not_starve_concurrent_sandboxes(isolation):
    """RLIMIT_NPROC counts per uid; each sandbox has its own, so a bomb fills only its own slots."""
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    normal = "import subprocess\nfor _ in range(3):\n    subprocess.run(['true'], check=True)\nprint('ok')"
    results = run_programs([bomb] + [normal] * 7, workers=4, timeout=2.0)
    assert results[0].status == "timeout"
    if isolation["user"] != "unprivileged":  # one shared uid: NPROC then counts all of our processes
        assert not ROOT
        pytest.skip("needs a uid per sandbox (root)")
    assert len({r.isolation["uid"] for r in results[:4]}) == 4
    assert [(r.status, r.stdout) for r in results[1:]] == [("passed", "ok\n")] * 7


@pytest.mark.parametrize("code", [
    "x = bytearray(10**10)\n",
    "x = []\nwhile True:\n    x.append(' ' * 10**6)\n",
])
def test_memory_bombs_hit_the_address_space_limit(code):
    result = run_program(program("done()\n" + code), timeout=5.0, memory_mb=256)
    assert (result.passed, result.status) == (False, "memory")
    assert result.reason.startswith("MemoryError: address-space limit 256 MiB")
    assert_host_unharmed(result, report_of(result))


@pytest.mark.parametrize("code, stream", [
    ("while True:\n    print('x' * 1000)\n", "stdout"),
    ("while True:\n    sys.stderr.write('y' * 1000)\n", "stderr"),
    ("sys.stdout.write('z' * 10**8)\n", "stdout"),  # one huge write
])
def test_output_floods_are_cut_off(code, stream):
    result = run_program(program("done()\n" + code), timeout=5.0, max_output=10000)
    assert (result.passed, result.status, result.reason) == (False, "output_limit", f"{stream} exceeded 10000 bytes (process group killed)")
    assert len(result.stdout.encode()) <= 10000 and len(result.stderr.encode()) <= 10000
    assert_host_unharmed(result, report_of(result))


def test_big_files_hit_the_file_size_limit():
    result = run_program(program('''
        done()
        with open("big.bin", "wb") as f:
            f.write(b"0" * (3 << 20))
    '''), max_file_mb=1)
    assert (result.status, result.reason) == ("output_limit", "file-size limit 1 MiB at line 14")
    assert_host_unharmed(result, report_of(result))


def test_files_outside_the_temp_dir_are_refused(isolation, host_files):
    if not ROOT:
        assert isolation["user"] == "same"  # reported missing: the program would succeed, so it is not run
        return
    assert isolation["user"] == "unprivileged"
    result = run_program(program('''
        attempt("visible", lambda: os.path.exists(sentinel))
        attempt("overwrite", lambda: open(sentinel, "w").write("pwned"))
        attempt("append", lambda: open(sentinel, "a").write("pwned"))
        attempt("delete", lambda: os.remove(sentinel))
        attempt("rename", lambda: os.rename(sentinel, sentinel + ".moved"))
        attempt("chmod", lambda: os.chmod(sentinel, 0o777))
        attempt("create", lambda: open(os.path.join(os.path.dirname(sentinel), "new.txt"), "w").write("x"))
        attempt("read_secret", lambda: open(secret).read())
        attempt("shell_rm", lambda: os.system(f"rm -f {sentinel} 2>/dev/null"))
        attempt("own_dir", lambda: open("mine.txt", "w").write("fine"))
        done()
    ''', sentinel=host_files.sentinel, secret=host_files.secret))
    report = report_of(result)
    assert result.passed and SECRET not in result.stdout + result.stderr
    refused = "PermissionError" if report["visible"] is True else "FileNotFoundError"  # a hidden dir is as good
    assert {k: report[k] for k in ("overwrite", "append", "delete", "rename", "chmod", "create", "read_secret")} == dict.fromkeys(
        ("overwrite", "append", "delete", "rename", "chmod", "create", "read_secret"), refused)
    assert report["own_dir"] == 4  # the temp dir is its own
    assert_sentinel_untouched(host_files)
    assert_host_unharmed(result, report)


def test_world_writable_directories_are_private(isolation):
    name = f"nanochat_sandbox_test_{os.getpid()}"
    if isolation["filesystem"] == "shared":
        assert not ROOT
        pytest.skip("without a mount namespace (root only) /tmp is the host's")
    result = run_program(program('''
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            attempt(d, lambda: open(os.path.join(d, name), "w").write("x"))
        report["tmp"] = sorted(os.listdir("/tmp"))
        done()
    ''', name=name))
    report = report_of(result)
    assert result.passed and report["/tmp"] == report["/var/tmp"] == report["/dev/shm"] == 1
    assert report["tmp"] == sorted([name, os.path.basename(report["cwd"])])  # none of the host's files
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(os.path.join(d, name))
    assert_host_unharmed(result, report)


def test_parent_environment_is_unreadable(isolation, monkeypatch):
    monkeypatch.setenv("NANOCHAT_SANDBOX_TEST_SECRET", SECRET)
    if not ROOT:
        assert isolation["user"] == "same"  # /proc/<our pid>/environ would be readable
        return
    result = run_program(program('''
        attempt("environ", lambda: SECRET_NAME in os.environ)
        attempt("ppid_environ", lambda: open(f"/proc/{os.getppid()}/environ", "rb").read().decode(errors="replace"))
        attempt("host_pid_environ", lambda: open(f"/proc/{host_pid}/environ", "rb").read().decode(errors="replace"))
        attempt("host_pid_cmdline", lambda: open(f"/proc/{host_pid}/cmdline", "rb").read().decode(errors="replace"))
        done()
    ''', SECRET_NAME="NANOCHAT_SANDBOX_TEST_SECRET", host_pid=os.getpid()))
    report = report_of(result)
    assert SECRET not in result.stdout + result.stderr
    assert report["environ"] is False
    for key in ("ppid_environ", "host_pid_environ"):
        assert report[key] in ("PermissionError", "FileNotFoundError")
    assert_host_unharmed(result, report)


def test_network_is_unreachable(isolation):
    """A server of ours on 127.0.0.1: the sandbox's loopback is another (down) interface."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        result = run_program(program('''
            attempt("socket", lambda: socket.socket().close())
            attempt("connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close())
            attempt("public", lambda: socket.create_connection(("1.1.1.1", 53), timeout=1).close())
            done()
        ''', port=server.getsockname()[1]), timeout=5.0)
        report = report_of(result)
        if isolation["network"] == "none":
            assert not ROOT
            pytest.skip("no network namespace here (reported as such)")
        assert report["socket"] == "ok"  # sockets exist; there is just nowhere to go
        assert report["connect"] == report["public"] == "OSError"
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected
    assert_host_unharmed(result, report)


def test_os_system_runs_inside_the_sandbox(isolation, host_files):
    if not ROOT:
        assert isolation["user"] == "same"
        return
    result = run_program(program('''
        attempt("system", lambda: os.system(f"id -u > uid.txt; echo pwned > {sentinel}; sleep 60 &"))
        attempt("uid", lambda: int(open("uid.txt").read()))
        done()
    ''', sentinel=host_files.sentinel))
    report = report_of(result)
    assert result.passed and report["system"] == 0
    assert report["uid"] == result.isolation["uid"] != 0
    assert_sentinel_untouched(host_files)
    assert_host_unharmed(result, report)  # the background sleep is gone too


def test_killing_the_parent_fails(isolation):
    if not ROOT:
        assert isolation["user"] == "same"  # it would succeed: not run
        return
    assert isolation["user"] == "unprivileged"
    result = run_program(program('''
        attempt("ppid", lambda: os.kill(os.getppid(), signal.SIGKILL))
        attempt("host_pid", lambda: os.kill(host_pid, signal.SIGKILL))
        attempt("everyone", lambda: os.kill(-1, signal.SIGKILL))
        done()
    ''', host_pid=os.getpid()))
    report = report_of(result)
    assert report["host_pid"] in ("PermissionError", "ProcessLookupError")
    os.kill(os.getpid(), 0)  # we are alive
    assert_host_unharmed(result, report)
