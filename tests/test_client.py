"""The launcher's Kubernetes client and its commands, against a stand-in of the API server.

No Kubernetes cluster can run where this suite runs (no kind, no network), so `StandIn` is a
small HTTP server on 127.0.0.1 that plays the API server for the few endpoints the client uses:
JSON objects, `Status` bodies on errors, bearer-token auth, chunked streaming of a followed log.
It records what the client sent, so the tests compare the exact Job body and DeleteOptions.
What it cannot show is how a real API server and Job controller behave; the Job and pod objects
it returns follow the shapes of batch/v1 and core/v1 as the documentation gives them.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from loraforge.errors import PermanentError, TransientError
from loraforge.launcher.client import Cluster, job_status
from loraforge.launcher.client_cmds import duration, wait_exit_code

ROOT = Path(__file__).parents[1]
LORAFORGE = Path(sys.executable).parent / "loraforge"
TOKEN = "stand-in-token-5f0c2e9a"  # a fake bearer token; no output may ever show it
NS = "ml-team"  # the kubeconfig context's namespace

JOB: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {
        "name": "r1-train",
        "namespace": NS,
        "labels": {"app.kubernetes.io/instance": "r1", "app.kubernetes.io/component": "train"},
    },
    "spec": {
        "backoffLimit": 3,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "train", "image": "loraforge:dev", "args": []}],
            }
        },
    },
}


def job_object(name: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS}, "status": status}


def failed(name: str, reason: str, message: str) -> dict[str, Any]:
    condition = {"type": "Failed", "status": "True", "reason": reason, "message": message}
    target = condition | {"type": "FailureTarget"}
    return job_object(name, failed=1, conditions=[target, condition])


def pod(
    name: str,
    job: str,
    phase: str,
    *,
    exit_code: int | None = None,
    message: str = "",
    age: int = 0,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if exit_code is not None:
        reason = "Completed" if exit_code == 0 else "Error"
        state = {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}}
    elif phase == "Pending":
        state = {"waiting": {"reason": "ImagePullBackOff", "message": "pulling loraforge:dev"}}
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"job-name": job},
            "creationTimestamp": f"2025-01-01T00:00:{age:02d}Z",
        },
        "spec": {"containers": [{"name": "train", "image": "loraforge:dev"}]},
        "status": {"phase": phase, "containerStatuses": [{"name": "train", "state": state}]},
    }


@dataclass
class StandIn:
    """What the stand-in API server answers (scripted) and what it was sent (recorded)."""

    kubeconfig: Path = Path()
    # GET answers: each list is a script, one entry per request, the last one repeated
    jobs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    pods: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    forbid: bool = False  # answer 403 like a namespace without the launcher's RoleBinding
    log_gate: threading.Event | None = None  # a followed log stops after 3 lines until set
    # recorded
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    log_queries: list[dict[str, list[str]]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def next_job(self, name: str) -> dict[str, Any] | None:
        script = self.jobs.get(name)
        if not script:
            return None
        return script.pop(0) if len(script) > 1 else script[0]

    def next_pods(self, job: str) -> list[dict[str, Any]]:
        script = self.pods.get(job) or [[]]
        return script.pop(0) if len(script) > 1 else script[0]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: StandIn


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, as the API server speaks
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        api.requests.append(f"{method} {self.path}")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(401, "Unauthorized", "Unauthorized")
        if api.forbid:
            return self._status(
                403,
                "Forbidden",
                'jobs.batch is forbidden: User "system:serviceaccount:ml-team:default" cannot '
                'create resource "jobs" in API group "batch" in the namespace "ml-team"',
            )
        parts = url.path.strip("/").split("/")
        if parts[:3] == ["apis", "batch", "v1"] and parts[3:4] == ["namespaces"]:
            return self._jobs(method, parts[4], parts[6:], body)
        if parts[:4] == ["api", "v1", "namespaces", NS] and parts[4] == "pods":
            if len(parts) == 5:
                job = query["labelSelector"][0].removeprefix("job-name=")
                return self._json(200, {"kind": "PodList", "items": api.next_pods(job)})
            return self._log(parts[5], query)
        if parts == ["api", "v1", "nodes"]:
            return self._json(200, {"kind": "NodeList", "items": api.nodes})
        return self._status(404, "NotFound", f"the server could not find {url.path}")

    def _jobs(self, method: str, ns: str, rest: list[str], body: Any) -> None:
        api = self.server.api
        if method == "POST":
            name = body["metadata"]["name"]
            if body["metadata"].get("namespace", ns) != ns:
                return self._status(400, "BadRequest", "the namespace of the object does not match")
            if name in api.jobs:
                return self._status(
                    409, "AlreadyExists", f'jobs.batch "{name}" already exists', name
                )
            api.created.append(body)
            api.jobs[name] = [body | {"status": {}}]
            return self._json(201, body)
        job = api.next_job(rest[0]) if ns == NS else None
        if job is None:
            return self._status(404, "NotFound", f'jobs.batch "{rest[0]}" not found', rest[0])
        if method == "DELETE":
            api.deleted.append((rest[0], body))
            del api.jobs[rest[0]]
            return self._json(200, {"kind": "Status", "status": "Success"})
        return self._json(200, job)

    def _log(self, pod_name: str, query: dict[str, list[str]]) -> None:
        api = self.server.api
        api.log_queries.append(query)
        lines = [f"{line}\n".encode() for line in api.logs[pod_name]]
        if query.get("follow") != ["true"]:
            return self._send(200, b"".join(lines), "text/plain")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, line in enumerate(lines):
            if i == 3 and api.log_gate is not None:
                api.log_gate.wait(10)  # set by the reader once it has shown the first 3 lines
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            time.sleep(0.02)
        self.wfile.write(b"0\r\n\r\n")

    def _status(self, code: int, reason: str, message: str, name: str = "") -> None:
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason}
        self._json(code, status | {"message": message, "code": code, "details": {"name": name}})

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stand-in", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": TOKEN}}],
        "contexts": [
            {
                "name": "stand-in",
                "context": {"cluster": "stand-in", "user": "tester", "namespace": NS},
            }
        ],
        "current-context": "stand-in",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandIn]:
    """A stand-in for the Kubernetes API server (no cluster can run here) and a kubeconfig for it.

    Served on 127.0.0.1 on a free port by a thread, and shut down at the end of the test.
    """
    api = StandIn()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.api = api
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api.kubeconfig = write_kubeconfig(
        tmp_path / "kubeconfig", f"http://127.0.0.1:{server.server_address[1]}"
    )
    yield api
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def cluster(standin: StandIn) -> Iterator[Cluster]:
    with Cluster.connect(kubeconfig=str(standin.kubeconfig)) as connected:
        yield connected


def run_cli(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`.venv/bin/loraforge ARGS` with KUBECONFIG set; never a traceback, never the token."""
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env |= {"KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)}
    done = subprocess.run(
        [str(LORAFORGE), *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    return done


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- submit ------------------------------------------------------------------------------------


def test_submit_sends_exactly_the_job_manifest(standin: StandIn, cluster: Cluster) -> None:
    assert cluster.submit(JOB) == "r1-train"
    assert standin.created == [JOB]
    assert standin.requests == [f"POST /apis/batch/v1/namespaces/{NS}/jobs"]


def test_submit_of_a_taken_run_id_names_the_fix(standin: StandIn, cluster: Cluster) -> None:
    cluster.submit(JOB)
    with pytest.raises(PermanentError, match=r"run id r1 is taken; set a new LORAFORGE_RUN_ID"):
        cluster.submit(JOB)
    assert standin.created == [JOB]


def test_submit_without_rbac_names_the_service_account_binding(
    standin: StandIn, cluster: Cluster
) -> None:
    standin.forbid = True
    with pytest.raises(PermanentError, match=r"forbidden by RBAC.*ServiceAccount") as err:
        cluster.submit(JOB)
    assert err.value.exit_code == 2


def test_a_wrong_token_is_a_permanent_error_that_never_shows_it(
    standin: StandIn, tmp_path: Path
) -> None:
    config = standin.kubeconfig.read_text().replace(TOKEN, "expired-token-0000")
    (tmp_path / "other").write_text(config)
    with (
        Cluster.connect(kubeconfig=str(tmp_path / "other")) as cluster,
        pytest.raises(PermanentError, match="refused the credentials") as err,
    ):
        cluster.status("r1-train")
    assert "expired-token-0000" not in str(err.value)


def test_submit_command_sends_the_rendered_job_and_prints_how_to_follow_it(
    standin: StandIn,
) -> None:
    standin.nodes = [
        {"metadata": {"name": "cpu-1", "labels": {"kubernetes.io/os": "linux"}}},
        {"metadata": {"name": "gpu-1", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4"}}},
    ]
    flags = ["train", "--env-file", "jobs/train.env", "--gpu", "auto", "--s3-secret", "s3"]
    rendered = run_cli(standin.kubeconfig, "render", *flags, "--namespace", NS)
    assert rendered.returncode == 0, rendered.stderr
    done = run_cli(standin.kubeconfig, "submit", *flags, "--namespace", NS)
    assert done.returncode == 0, done.stderr
    assert standin.created == [yaml.safe_load(rendered.stdout)]  # --gpu auto read the nodes
    name = "qwen05-gsm8k-lora-train"
    assert done.stdout == f"{name}\n"  # NAME=$(loraforge submit ...)
    for follow_up in ("logs -f", "wait", "status", "cancel"):
        assert f"  loraforge {follow_up} {name}\n" in done.stderr
    again = run_cli(standin.kubeconfig, "submit", *flags, "--namespace", NS)
    assert again.returncode == 2
    assert "run id qwen05-gsm8k-lora is taken" in one_line(again.stderr)


# -- wait and status ---------------------------------------------------------------------------


def test_wait_returns_when_the_job_completes(standin: StandIn, cluster: Cluster) -> None:
    standin.jobs["r1-train"] = [
        job_object("r1-train", active=1),
        job_object("r1-train", active=1, ready=1),
        job_object("r1-train", succeeded=1, conditions=[{"type": "Complete", "status": "True"}]),
    ]
    standin.pods["r1-train"] = [[pod("r1-train-a", "r1-train", "Succeeded", exit_code=0)]]
    status = cluster.wait("r1-train", timeout_s=30, poll_s=0.01)
    assert (status.phase, status.succeeded, status.exit_code) == ("Complete", 1, 0)
    assert wait_exit_code(status) == 0
    job_reads = [r for r in standin.requests if r.endswith("/jobs/r1-train")]
    assert len(job_reads) == 4  # three polls, then the final status


def test_wait_times_out_with_a_transient_error(standin: StandIn, cluster: Cluster) -> None:
    standin.jobs["r1-train"] = [job_object("r1-train", active=1, ready=1)]
    with pytest.raises(TransientError, match=r"not finished after 0.1 s.*loraforge cancel"):
        cluster.wait("r1-train", timeout_s=0.1, poll_s=0.02)


FAILURES = [
    # reason of the Failed condition, pod exit code, termination message, `wait` exit code
    ("PodFailurePolicy", 2, "LORAFORGE_DATA: missing.jsonl not found; fix the path", 2),
    ("BackoffLimitExceeded", 75, "store s3://b/p unreachable after 5 tries", 75),
    ("DeadlineExceeded", 143, "SIGTERM: checkpoint step 400 published", 143),
    ("BackoffLimitExceeded", 137, "", 1),
]


@pytest.mark.parametrize(("reason", "exit_code", "message", "expected"), FAILURES)
def test_wait_command_explains_a_failed_job(
    standin: StandIn, reason: str, exit_code: int, message: str, expected: int
) -> None:
    standin.jobs["r1-train"] = [
        job_object("r1-train", active=1, ready=1),
        failed("r1-train", reason, f"controller says {reason}"),
    ]
    standin.pods["r1-train"] = [
        [
            pod("r1-train-b", "r1-train", "Failed", exit_code=exit_code, message=message, age=9),
            pod("r1-train-a", "r1-train", "Failed", exit_code=1, message="older pod", age=1),
        ]
    ]
    done = run_cli(standin.kubeconfig, "wait", "r1-train", "--poll", "0.05", "--timeout", "1m")
    assert done.returncode == expected
    line = one_line(done.stderr)
    assert line.startswith("loraforge wait: Job r1-train Failed")
    assert reason in line
    assert f"pod r1-train-b exited {exit_code}" in line
    assert message in line
    assert "older pod" not in line


def test_a_json_log_line_in_the_termination_message_shows_its_msg() -> None:
    log_line = json.dumps({"level": "error", "msg": "LORAFORGE_RANK must be > 0", "exit_code": 2})
    job = failed("r1-train", "PodFailurePolicy", "matched FailJob rule")
    lines = f"step 1\n{log_line}\n"
    status = job_status(job, [pod("p", "r1-train", "Failed", exit_code=2, message=lines)])
    assert status.describe().endswith(": LORAFORGE_RANK must be > 0")
    assert wait_exit_code(status) == 2


def test_status_json_reports_phase_reason_pods_and_exit_code(standin: StandIn) -> None:
    standin.jobs["r1-train"] = [failed("r1-train", "PodFailurePolicy", "FailJob rule 0")]
    standin.pods["r1-train"] = [
        [pod("r1-train-a", "r1-train", "Failed", exit_code=2, message="bad LORAFORGE_RANK")]
    ]
    done = run_cli(standin.kubeconfig, "status", "r1-train", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["phase"] == "Failed"
    assert status["reason"] == "PodFailurePolicy"
    assert status["failed"] == 1
    assert (status["exit_code"], status["termination_message"]) == (2, "bad LORAFORGE_RANK")
    assert status["pods"] == [
        {
            "name": "r1-train-a",
            "phase": "Failed",
            "exit_code": 2,
            "reason": "Error",
            "message": "bad LORAFORGE_RANK",
        }
    ]


def test_status_of_a_pending_job_names_the_waiting_reason(
    standin: StandIn, cluster: Cluster
) -> None:
    standin.jobs["r1-train"] = [job_object("r1-train", active=1)]
    standin.pods["r1-train"] = [[pod("r1-train-a", "r1-train", "Pending")]]
    status = cluster.status("r1-train")
    assert status.phase == "Pending"
    assert "pod r1-train-a Pending: ImagePullBackOff" in status.describe()


def test_status_of_a_missing_job_is_one_line_exit_2(standin: StandIn) -> None:
    done = run_cli(standin.kubeconfig, "status", "nope")
    assert done.returncode == 2
    assert f"no Job nope in namespace {NS}" in one_line(done.stderr)
    other = run_cli(standin.kubeconfig, "status", "nope", "--namespace", "other")
    assert "no Job nope in namespace other" in one_line(other.stderr)


# -- logs --------------------------------------------------------------------------------------


class _Screen(io.StringIO):
    """An output stream that opens the stand-in's gate once the first three lines arrived."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.getvalue().count("\n") >= 3:
            self.gate.set()
        return written


def test_logs_follow_streams_lines_as_they_are_written(standin: StandIn, cluster: Cluster) -> None:
    lines = [f"step {i} loss {1 / (i + 1):.3f}" for i in range(8)]
    standin.jobs["r1-train"] = [job_object("r1-train", active=1, ready=1)]
    standin.pods["r1-train"] = [
        [],  # no pod yet
        [pod("r1-train-a", "r1-train", "Pending")],
        [pod("r1-train-a", "r1-train", "Running")],
    ]
    standin.logs["r1-train-a"] = lines
    standin.log_gate = threading.Event()
    screen = _Screen(standin.log_gate)
    # the stand-in holds line 4 back until the reader has shown lines 1-3: a reader that
    # buffered the stream would wait 10 s, and the gate would open by the timeout instead
    started = time.monotonic()
    assert cluster.logs("r1-train", follow=True, out=screen, poll_s=0.01) == "r1-train-a"
    assert time.monotonic() - started < 8
    assert screen.getvalue() == "".join(f"{line}\n" for line in lines)
    assert standin.log_queries[-1]["container"] == ["train"]


def test_logs_wait_for_a_pod_to_start_then_give_up(standin: StandIn, cluster: Cluster) -> None:
    standin.jobs["r1-train"] = [job_object("r1-train", active=1)]
    standin.pods["r1-train"] = [[pod("r1-train-a", "r1-train", "Pending")]]
    with pytest.raises(TransientError, match=r"no started pod after 0.1 s.*ImagePullBackOff"):
        cluster.logs("r1-train", follow=True, out=io.StringIO(), pod_timeout_s=0.1, poll_s=0.02)


def test_logs_command_prints_the_newest_pods_log(standin: StandIn) -> None:
    standin.jobs["r1-train"] = [job_object("r1-train", failed=1, active=1, ready=1)]
    standin.pods["r1-train"] = [
        [
            pod("r1-train-b", "r1-train", "Running", age=5),
            pod("r1-train-a", "r1-train", "Failed", exit_code=75, age=1),
        ]
    ]
    standin.logs |= {"r1-train-a": ["first try"], "r1-train-b": ["second try", "step 1", "step 2"]}
    follow = run_cli(standin.kubeconfig, "logs", "-f", "r1-train")
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout == "second try\nstep 1\nstep 2\n"
    once = run_cli(standin.kubeconfig, "logs", "r1-train")
    assert once.stdout == follow.stdout
    assert [q["follow"] for q in standin.log_queries] == [["true"], ["false"]]


# -- cancel, nodes, connection -----------------------------------------------------------------


def test_cancel_deletes_the_job_with_its_pods(standin: StandIn) -> None:
    standin.jobs["r1-train"] = [job_object("r1-train", active=1)]
    done = run_cli(standin.kubeconfig, "cancel", "r1-train")
    assert done.returncode == 0, done.stderr
    ((name, options),) = standin.deleted
    assert name == "r1-train"
    assert options["propagationPolicy"] == "Foreground"  # pods go too, before the Job
    again = run_cli(standin.kubeconfig, "cancel", "r1-train")
    assert again.returncode == 2
    assert "no Job r1-train" in one_line(again.stderr)


def test_list_nodes_gives_names_and_labels(standin: StandIn, cluster: Cluster) -> None:
    labels = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"}
    standin.nodes = [
        {"metadata": {"name": "gpu-1", "labels": labels}},
        {"metadata": {"name": "cpu-1"}},
    ]
    assert cluster.list_nodes() == [("gpu-1", labels), ("cpu-1", {})]


def test_an_unreachable_api_server_is_exit_75_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    for command in (["status", "r1-train"], ["wait", "r1-train"], ["cancel", "r1-train"]):
        done = run_cli(kubeconfig, *command)
        assert done.returncode == 75, done.stderr
        line = one_line(done.stderr)
        assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in line
        assert "Connection refused" in line


def test_a_missing_kubeconfig_is_exit_2(tmp_path: Path) -> None:
    done = run_cli(tmp_path / "absent", "status", "r1-train")
    assert done.returncode == 2
    assert "kubeconfig" in one_line(done.stderr)


def test_the_namespace_comes_from_the_flag_else_the_context(standin: StandIn) -> None:
    def namespace(flag: str | None = None) -> str:
        with Cluster.connect(flag, kubeconfig=str(standin.kubeconfig)) as cluster:
            return cluster.namespace

    assert (namespace(), namespace("other")) == (NS, "other")
    plain = yaml.safe_load(standin.kubeconfig.read_text())
    del plain["contexts"][0]["context"]["namespace"]
    standin.kubeconfig.write_text(yaml.safe_dump(plain))
    assert namespace() == "loraforge"


def test_durations_read_seconds_minutes_and_hours() -> None:
    assert [duration(t) for t in ("90", "1.5s", "30m", "2h")] == [90, 1.5, 1800, 7200]


def test_without_kubeconfig_or_service_account_connect_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(PermanentError, match="no Kubernetes credentials: set KUBECONFIG"):
        Cluster.connect()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a pod, but no token mounted
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(PermanentError, match="in-cluster ServiceAccount"):
        Cluster.connect()
