"""Real processes: a `lateflow index` killed with SIGKILL and resumed, the lock across processes, and
`lateflow deploy` serving a scheduled deployment on a real local Prefect server.

One `prefect server start` on a free loopback port (temporary PREFECT_HOME) serves the whole module,
so the CLI subprocesses do not each start an ephemeral server. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from flows.index import index_flow
from storage import index_files as files
from storage.manifest import read_manifest, resolve_index_dir
from tests.conftest import REPO, write_jsonl
from tests.test_incremental import SMALL_ARGS, assert_same_index, config as small_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process we started (and its process group, which it leads), escalating to SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start --host 127.0.0.1 --port <free> --analytics-off` with a throw-away PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "the Prefect server to be healthy", proc, log, every=0.5)
        yield url
    finally:
        stop(proc)


def cli_env(api_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_API_URL=api_url, PYTHONUNBUFFERED="1")
    return env


def test_a_killed_run_resumes_without_redoing_finished_segments(tmp_path, prefect_server, limit_small, prefect_harness):
    n_docs, shard = 24, 2
    lines = (limit_small / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n_docs]
    corpus, index = write_jsonl(tmp_path / "corpus.jsonl", lines), tmp_path / "index"
    command = [str(BIN / "lateflow"), "index", str(corpus), "--index", str(index), *SMALL_ARGS, "--shard-size", str(shard)]
    n_segments = -(-n_docs // shard)
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=cli_env(prefect_server), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        cache = index / files.CACHE_DIR
        wait_for(lambda: list(cache.glob("tokens-*.parquet")), 180, "the first encoded segment", proc, log, every=0.02)
        # while it runs, the index folder is locked: another process is refused at once, told who holds it
        probe = subprocess.run(
            [sys.executable, "-c", f"from storage.lock import IndexLock; IndexLock({str(index)!r}).acquire()"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        assert probe.returncode != 0 and f"is locked by pid {proc.pid} since" in probe.stderr and "another lateflow index run" in probe.stderr
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc, signal.SIGKILL)
    finished = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in cache.glob("tokens-*.parquet")}
    assert 1 <= len(finished) < n_segments, "the run was not killed mid-way; make the corpus bigger"
    assert not (index / "manifest.json").exists()  # nothing half-built is visible as an index

    resumed = subprocess.run(command, env=cli_env(prefect_server), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = read_manifest(index)
    assert manifest["incremental"]["segments_encoded"] == n_segments - len(finished)
    assert f"in {n_segments - len(finished)} of {n_segments} segments" in resumed.stdout
    for name, facts in finished.items():  # finished segments were not redone
        path = cache / name
        assert (path.stat().st_mtime_ns, path.stat().st_ino) == facts

    # no duplicate or missing chunk, and the same index as one clean build
    chunks = pq.read_table(resolve_index_dir(index) / files.CHUNKS_FILE, columns=["doc_id", "ordinal"]).to_pylist()
    assert len({(c["doc_id"], c["ordinal"]) for c in chunks}) == len(chunks)
    assert manifest["counts"]["docs"] == n_docs
    index_flow(str(corpus), str(tmp_path / "clean"), small_config(shard_size=shard))
    assert_same_index(index, tmp_path / "clean")


def test_deploy_serves_a_scheduled_deployment_whose_run_builds_the_index(tmp_path, prefect_server, limit_small):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    docs = (limit_small / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    index = tmp_path / "index"
    log = tmp_path / "deploy.log"
    command = [str(BIN / "lateflow"), "deploy", str(corpus), "--index", str(index), "--cron", "0 2 * * *", "--name", "ci", *SMALL_ARGS, "--shard-size", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=cli_env(prefect_server), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:

            def deployment():
                try:
                    return client.read_deployment_by_name("index/ci")
                except Exception:  # ObjectNotFound until `flow.serve` has registered it
                    return None

            registered = wait_for(deployment, 180, "the deployment index/ci", proc, log, every=0.5)
            assert [s.schedule.cron for s in registered.schedules] == ["0 2 * * *"]
            assert registered.parameters["index_dir"] == str(index)
            run = client.create_flow_run_from_deployment(registered.id)  # what "Quick run" in the UI does

            def finished():
                state = client.read_flow_run(run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_for(finished, 240, "the flow run to finish", proc, log, every=0.5)
            assert state.is_completed(), f"{state.type}: {state.message}\n{log.read_text()[-3000:]}"
    finally:
        stop(proc, signal.SIGINT)
    manifest = read_manifest(index)
    assert manifest["counts"]["docs"] == 4 and json.loads((index / "manifest.json").read_text())["current"].startswith("versions/")


def test_deploy_without_a_server_explains_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [str(BIN / "lateflow"), "deploy", str(tmp_path / "c.jsonl"), "--index", str(tmp_path / "i"), "--cron", "0 2 * * *"],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
    )
    assert result.returncode == 2
    assert "PREFECT_API_URL is not set" in result.stderr and "prefect server start --host 127.0.0.1" in result.stderr


def test_bad_input_is_one_line_per_report_without_tracebacks(tmp_path, prefect_server, limit_small):
    """A malformed corpus line: Prefect's task and flow failure records keep their message, lose
    the traceback (the CLI's last line says it all); exit status 2."""
    lines = (limit_small / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [lines[0], '{"_id": "broken", "text": ', lines[1]])
    done = subprocess.run(
        [str(BIN / "lateflow"), "index", str(corpus), "--index", str(tmp_path / "index"), *SMALL_ARGS],
        env=cli_env(prefect_server), capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"lateflow index: error: {corpus}:2: malformed JSON")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, limit_small):
    """Ctrl-C in a terminal signals the whole process group: the CLI and Prefect's temporary API
    server. Whatever surfaces (KeyboardInterrupt, or the flow's next API call failing), the CLI says
    it was interrupted and exits 130; the next run resumes."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONUNBUFFERED="1")
    index = tmp_path / "index"
    log = tmp_path / "cli.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "lateflow"), "index", str(limit_small), "--index", str(index), *SMALL_ARGS, "--shard-size", "5"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO,
        )
    try:
        wait_for(lambda: list((index / ".cache").glob("tokens-*.parquet")), 240, "the first encoded segment", proc, log)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    finally:
        stop(proc, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert text.strip().splitlines()[-1] == "lateflow index: interrupted; run the same command again to resume", text[-3000:]
    assert "Traceback" not in text, text[-3000:]
