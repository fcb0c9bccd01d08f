"""The runner with real processes: outcomes, output streaming, cancel, launcher lifecycle."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from scheduler import procs
from scheduler.runner import LINE_LIMIT, Runner
from tests.runner_tasks import Collector, read_pids, request, wait_gone


def test_success_reports_pid_and_start_marker(runner: Runner) -> None:
    h = runner.launch(request("noop"))
    res = h.wait(10)
    assert res is not None
    assert (res.status, res.exit_code, res.signal, res.error) == ("success", 0, None, None)
    assert h.pid and h.pid != os.getpid()
    assert h.task_started is not None
    assert h.started_at.timestamp() - 0.01 <= h.task_started <= res.ended_at.timestamp() + 0.01
    assert res.started_at == h.started_at and res.duration >= 0


def test_a_run_launched_ahead_starts_its_task_on_the_dot(runner: Runner, col: Collector) -> None:
    slot = time.time() + 0.4
    h = runner.launch(request("stamp", not_before=slot, timeout=0.2))
    res = h.wait(10)
    assert res is not None and res.status == "success"  # the wait is not part of the timeout
    (began,) = (float(x) for x in col.out(h.run_id))
    assert h.task_started is not None and h.task_started < slot  # forked ahead of time
    assert slot <= began < slot + 0.05  # the task function itself ran at the slot


def test_prepare_runs_before_the_slot_and_the_task_at_it(runner: Runner, col: Collector) -> None:
    slot = time.time() + 0.3
    h = runner.launch(request("prepared", not_before=slot))
    assert h.wait(10) is not None
    (line,) = col.out(h.run_id)
    _, prepared, _, began = line.split()
    assert float(prepared) < slot <= float(began) < slot + 0.05


def test_params_and_braces_delivered_verbatim(runner: Runner, col: Collector) -> None:
    text = "a {} b {name} c {0!r} %s\nsecond line\tend\n"
    req = request("say", {"text": text, "err": "{oops}\n"})
    assert runner.launch(req).wait(10).status == "success"  # type: ignore[union-attr]
    assert col.out(req.run_id) == ["a {} b {name} c {0!r} %s", "second line\tend"]
    assert col.out(req.run_id, "stderr") == ["{oops}"]
    req = request("echo", {"x": "{}", "n": [1, 2]})
    runner.launch(req).wait(10)
    assert json.loads(col.out(req.run_id)[0])["params"] == {"x": "{}", "n": [1, 2]}


def test_last_line_without_newline_is_delivered_at_eof(runner: Runner, col: Collector) -> None:
    req = request("say", {"text": "one\ntwo"})
    runner.launch(req).wait(10)
    assert col.out(req.run_id) == ["one", "two"]


def test_exception_is_failed_with_type_and_traceback(runner: Runner, col: Collector) -> None:
    req = request("fail")
    res = runner.launch(req).wait(10)
    assert res is not None
    assert (res.status, res.exit_code, res.error) == ("failed", 1, "ValueError")
    assert col.out(req.run_id, "stderr")[-1] == "ValueError: boom"


def test_exit_code(runner: Runner) -> None:
    res = runner.launch(request("exit3")).wait(10)
    assert res is not None
    assert (res.status, res.exit_code, res.error, res.signal) == ("failed", 3, None, None)


def test_death_by_signal_is_killed_with_signal_name(runner: Runner) -> None:
    h = runner.launch(request("sigkill_self"))
    res = h.wait(10)
    assert res is not None
    assert (res.status, res.signal, res.exit_code) == ("killed", "SIGKILL", None)
    assert h.reason == "task died by SIGKILL"


def test_missing_target_and_bad_cwd_fail_clearly(runner: Runner) -> None:
    res = runner.launch(request("no_such_function")).wait(10)
    assert res is not None and (res.status, res.exit_code) == ("failed", 127)
    res = runner.launch(request("noop", cwd="/nonexistent/dir")).wait(10)
    assert res is not None
    assert (res.status, res.exit_code, res.error) == ("failed", 126, "FileNotFoundError")


def test_stdin_is_empty(runner: Runner, col: Collector) -> None:
    req = request("read_stdin")
    runner.launch(req).wait(10)
    assert col.out(req.run_id) == ["''"]


def test_environment_is_exactly_the_given_dict(
    runner: Runner, col: Collector, tmp_path: Path
) -> None:
    env = {"ONLY": "this", "EMPTY": "", "WEIRD": "{x} ü"}
    req = request("echo_env", env=env, cwd=str(tmp_path))
    runner.launch(req).wait(10)
    got = json.loads(col.out(req.run_id)[0])
    assert got == {"env": env, "c_env": env, "cwd": str(tmp_path)}


def test_done_callback_called_once(runner: Runner) -> None:
    calls: list[str] = []
    h = runner.launch(request("noop"))
    h.add_done_callback(lambda r: calls.append(f"early:{r.status}"))
    h.wait(10)
    h.add_done_callback(lambda r: calls.append(f"late:{r.status}"))
    assert calls == ["early:success", "late:success"]


def test_cancel_ends_run_as_killed_with_reason(runner: Runner, col: Collector) -> None:
    req = request("sleep", {"seconds": 30}, kill_grace=5)
    h = runner.launch(req)
    h.cancel("replaced by a newer run")
    res = h.wait(10)
    assert res is not None
    assert (res.status, res.signal) == ("killed", "SIGTERM")
    assert h.reason == "replaced by a newer run"
    assert res.duration < 4, "a SIGTERM-respecting task must not wait for the grace"
    assert any(e.startswith("cancelled: sent SIGTERM to 1 process") for e in col.events[req.run_id])
    h.cancel()  # after the end: no-op


def test_concurrent_launches_from_threads_leak_no_fds(runner: Runner) -> None:
    runner.launch(request("noop")).wait(10)
    fds_before = len(os.listdir("/proc/self/fd"))  # noqa: PTH208
    handles = []
    lock = threading.Lock()

    def launch_some() -> None:
        for _ in range(10):
            h = runner.launch(request("noop"))
            with lock:
                handles.append(h)

    threads = [threading.Thread(target=launch_some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [h.wait(20) for h in handles]
    assert [r.status if r else None for r in results] == ["success"] * 40
    assert runner.running() == []
    assert len(os.listdir("/proc/self/fd")) == fds_before  # noqa: PTH208
    launcher_fds = os.listdir(f"/proc/{runner.launcher_pid}/fd")  # noqa: PTH208
    assert len(launcher_fds) == 4, "0-2 and the control socket: nothing of any run"


def test_duplicate_run_id_is_refused(runner: Runner) -> None:
    req = request("sleep", {"seconds": 30}, kill_grace=1)
    h = runner.launch(req)
    with pytest.raises(ValueError, match="already running"):
        runner.launch(req)
    h.cancel()
    assert h.wait(10) is not None


def test_long_lines_are_cut_at_64k_on_character_boundaries(runner: Runner, col: Collector) -> None:
    text = "a" + "é" * 40_000 + "\nshort\n"  # 80_001 bytes: the 64 KiB cut splits an "é"
    req = request("say", {"text": text})
    runner.launch(req).wait(10)
    out = col.out(req.run_id)
    assert "".join(out[:-1]) == text.split("\n")[0]
    assert out[-1] == "short"
    assert all(len(p.encode()) <= LINE_LIMIT for p in out) and "\ufffd" not in "".join(out)
    assert len(out) == 3


def test_endless_line_arrives_in_64k_pieces_until_timeout(tmp_path: Path) -> None:
    sizes: list[int] = []
    bad: list[str] = []

    def on_line(job: str, run: str, stream: str, text: str) -> None:
        sizes.append(len(text))
        if text.strip("y"):
            bad.append(text[:20])

    r = Runner(on_line=on_line)
    r.start()
    try:
        res = r.launch(request("endless_line", timeout=0.5, kill_grace=0.5)).wait(10)
    finally:
        r.close(1)
    assert res is not None and res.status == "timeout" and res.signal == "SIGTERM"
    assert len(sizes) > 10 and not bad
    assert all(s == LINE_LIMIT for s in sizes[:-1]) and 0 < sizes[-1] <= LINE_LIMIT


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_100mb_of_output_is_delivered_with_flat_memory() -> None:
    count = {"lines": 0, "bytes": 0, "peak": 0}

    def on_line(job: str, run: str, stream: str, text: str) -> None:
        count["lines"] += 1
        count["bytes"] += len(text) + 1
        if count["lines"] % 2000 == 0:
            count["peak"] = max(count["peak"], _rss_kib())

    r = Runner(on_line=on_line)
    r.start()
    before = _rss_kib()
    try:
        t0 = time.monotonic()
        res = r.launch(request("flood", {"mb": 100})).wait(60)
        elapsed = time.monotonic() - t0
    finally:
        r.close(1)
    assert res is not None and res.status == "success"
    assert count["lines"] == 100 * 1024 and count["bytes"] == 100 * 1024 * 1024
    growth_mb = (max(count["peak"], _rss_kib()) - before) / 1024
    assert growth_mb < 50, f"daemon RSS grew {growth_mb:.1f} MB"
    print(f"100 MB in {elapsed:.2f}s, RSS growth {growth_mb:.1f} MB")


def test_launcher_restarts_after_it_is_killed(tmp_path: Path) -> None:
    col = Collector()
    r = Runner(on_line=col.on_line, on_event=col.on_event)
    r.start()
    try:
        old = r.launcher_pid
        assert old is not None
        pidfile = tmp_path / "pids"
        req = request("escapees", {"pidfile": str(pidfile)}, kill_grace=0.5)
        h = r.launch(req)
        pids = read_pids(pidfile)
        assert len(pids) == 3
        os.kill(old, signal.SIGKILL)
        res = h.wait(10)
        assert res is not None and res.status == "killed"
        assert h.reason is not None and "launcher died" in h.reason
        assert wait_gone(pids.values()) == []
        res2 = r.launch(request("noop")).wait(10)
        assert res2 is not None and res2.status == "success"
        assert r.launcher_pid not in (None, old)
    finally:
        r.close(1)


def test_close_ends_running_runs_and_is_idempotent(tmp_path: Path) -> None:
    col = Collector()
    r = Runner(on_line=col.on_line)
    r.start()
    launcher = r.launcher_pid
    assert launcher is not None
    h = r.launch(request("stubborn", kill_grace=30))
    deadline = time.monotonic() + 5
    while not col.out(h.run_id) and time.monotonic() < deadline:
        time.sleep(0.01)  # "ready": SIGTERM is ignored from now on
    t0 = time.monotonic()
    r.close(grace=0.3)
    assert time.monotonic() - t0 < 3
    res = h.result
    assert res is not None and (res.status, res.signal) == ("killed", "SIGKILL")
    assert h.reason == "shutdown"
    assert h.pid is not None and wait_gone([h.pid, launcher]) == []
    r.close(1)
    with pytest.raises(RuntimeError):
        r.launch(request("noop"))


def test_launcher_is_single_threaded_with_no_stray_children(runner: Runner) -> None:
    pid = runner.launcher_pid
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    assert "\nThreads:\t1\n" in status
    runner.launch(request("noop")).wait(10)
    deadline = time.monotonic() + 2
    while procs.children(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procs.children(pid) == []
