"""A thin client of the Kubernetes API: submit a rendered Job, follow it, read its logs, cancel it.

Built on the official `kubernetes` client, with every answer read as plain JSON (the API's own
camelCase, as `kubectl get -o json` shows it), so the untyped client stays behind `Cluster`.
Failures become the two error kinds of `loraforge.errors`: `PermanentError` (exit 2: fix the
spec, the kubeconfig or RBAC first) and `TransientError` (exit 75: the API server did not answer;
try again). Messages never include credentials: they name the server, never the request headers.
"""

from __future__ import annotations

import codecs
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, cast

from loraforge.errors import LoraforgeError, PermanentError, TransientError

Phase = Literal["Pending", "Running", "Complete", "Failed"]

DEFAULT_NAMESPACE = "loraforge"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
TIMEOUT = (10.0, 60.0)  # (connect, read) seconds of one API request
# A followed log may stay quiet for long and the client takes no (connect, no read) pair, so it
# has no timeout, like `kubectl logs -f`; the API server has just answered the pod listing.
STREAM_TIMEOUT = None
WAIT_RETRIES = 5  # consecutive unanswered polls `wait` tolerates before giving up
LAUNCHER_ROLE = "Role loraforge-launcher"  # k8s/base/rbac.yaml: jobs, pods, pods/log
# The Kubeflow kinds `loraforge render train --engine` renders (docs/scale.md).
CUSTOM_PLURALS = {"TrainJob": "trainjobs", "PyTorchJob": "pytorchjobs"}

# What a pod's exit code means (design.md, "Exit codes and Kubernetes semantics").
EXIT_MEANING = {
    0: "published",
    1: "unexpected error, a bug: see `loraforge logs`",
    2: "bad configuration or input: fix the spec, retrying cannot help",
    75: "transient: store or hub unreachable after retries",
    137: "killed by SIGKILL: out of memory, or still running after the grace period",
    143: "stopped by SIGTERM: preemption, node drain, cancel or activeDeadlineSeconds",
}
# Why the Job controller marked a Job Failed (the reason of its `Failed` condition).
FAILED_MEANING = {
    "PodFailurePolicy": "a pod failure matched a FailJob rule of the podFailurePolicy",
    "BackoffLimitExceeded": "pods failed more often than backoffLimit allows",
    "DeadlineExceeded": "the Job ran longer than activeDeadlineSeconds",
}


@dataclass
class PodStatus:
    """One pod of a Job: phase, and its container's exit code and termination message if ended."""

    name: str
    phase: str
    exit_code: int | None = None
    reason: str | None = None  # OOMKilled, Error, ImagePullBackOff, Evicted, DisruptionTarget ...
    message: str | None = None  # the termination message (last log lines: FallbackToLogsOnError)


@dataclass
class JobStatus:
    """Where a Job stands; `exit_code`/`termination_message` are the newest ended pod's."""

    name: str
    namespace: str
    phase: Phase
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    reason: str | None = None  # of the Failed condition (or Suspended)
    message: str | None = None
    pods: list[PodStatus] = field(default_factory=list)
    exit_code: int | None = None
    termination_message: str | None = None

    @property
    def done(self) -> bool:
        return self.phase in ("Complete", "Failed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: the phase, why the Job failed and what its last ended pod said."""
        counts = f"{self.active} active, {self.succeeded} succeeded, {self.failed} failed"
        head = f"Job {self.name} {self.phase} ({counts})"
        if self.phase == "Complete":
            return head
        parts = []
        if self.reason:
            meaning = FAILED_MEANING.get(self.reason)
            why = f"{self.reason} ({meaning})" if meaning else self.reason
            parts.append(f"{why}: {self.message}" if self.message else why)
        ended = next((p for p in reversed(self.pods) if p.exit_code is not None), None)
        if ended is not None and ended.exit_code:
            meaning = EXIT_MEANING.get(ended.exit_code, ended.reason or "failed")
            said = one_line(ended.message or "")
            parts.append(f"pod {ended.name} exited {ended.exit_code} ({meaning})")
            parts[-1] += f": {said}" if said else ""
        elif self.pods and self.pods[-1].reason:
            pod = self.pods[-1]
            parts.append(f"pod {pod.name} {pod.phase}: {pod.reason}")
            parts[-1] += f" ({pod.message})" if pod.message else ""
        return f"{head}: {'; '.join(parts)}" if parts else head


def one_line(text: str, limit: int = 500) -> str:
    """The last non-empty line of a termination message (a JSON log line gives its `msg`)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    if line.startswith("{"):
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("msg"), str):
            line = parsed["msg"]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conditions if c.get("status") == "True"}


def pod_status(pod: dict[str, Any]) -> PodStatus:
    """Read a pod's JSON: the first container's terminated (else waiting) state."""
    status = pod.get("status") or {}
    result = PodStatus(name=pod["metadata"]["name"], phase=status.get("phase", "Unknown"))
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        ended = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
        if ended:
            result.exit_code = ended.get("exitCode")
            result.reason, result.message = ended.get("reason"), ended.get("message")
            return result
        if state.get("waiting"):
            result.reason = state["waiting"].get("reason")
            result.message = state["waiting"].get("message")
            return result
    disruption = _true_conditions(pod).get("DisruptionTarget")
    if disruption:
        result.reason, result.message = "DisruptionTarget", disruption.get("message")
    elif status.get("reason"):  # Evicted, DeadlineExceeded, Unschedulable ...
        result.reason, result.message = status["reason"], status.get("message")
    return result


def job_status(job: dict[str, Any], pods: list[dict[str, Any]]) -> JobStatus:
    """Read a Job's JSON and its pods' JSON (any order) into a `JobStatus`."""
    status = job.get("status") or {}
    ordered = sorted(
        pods, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"])
    )
    pod_states = [pod_status(p) for p in ordered]
    result = JobStatus(
        name=job["metadata"]["name"],
        namespace=job["metadata"].get("namespace", ""),
        phase=_phase(job, pod_states),
        active=int(status.get("active", 0)),
        succeeded=int(status.get("succeeded", 0)),
        failed=int(status.get("failed", 0)),
        pods=pod_states,
    )
    conditions = _true_conditions(job)
    condition = conditions.get("Failed") or conditions.get("Suspended")
    if condition:
        result.reason, result.message = condition.get("reason"), condition.get("message")
    ended = next((p for p in reversed(pod_states) if p.exit_code is not None), None)
    if ended is not None:
        result.exit_code, result.termination_message = ended.exit_code, ended.message
    return result


def _phase(job: dict[str, Any], pods: list[PodStatus]) -> Phase:
    conditions = _true_conditions(job)
    if "Complete" in conditions:
        return "Complete"
    if "Failed" in conditions:
        return "Failed"
    ready = int((job.get("status") or {}).get("ready", 0))
    return "Running" if ready or any(p.phase == "Running" for p in pods) else "Pending"


class Cluster:
    """One namespace of one cluster, reached through a kubeconfig or the pod's ServiceAccount."""

    def __init__(self, api_client: Any, namespace: str, server: str) -> None:
        from kubernetes import client

        self._api_client = api_client
        self.namespace = namespace
        self.server = server
        # the client's models are bypassed (plain JSON in and out): Any is the boundary
        self._batch: Any = client.BatchV1Api(api_client)
        self._core: Any = client.CoreV1Api(api_client)

    @classmethod
    def connect(
        cls, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None
    ) -> Cluster:
        """Load `kubeconfig` (else $KUBECONFIG, else ~/.kube/config), else the in-cluster config.

        The namespace is `namespace`, else the context's, else the pod's ServiceAccount's,
        else "loraforge".
        """
        from kubernetes import client
        from kubernetes import config as kube_config

        config: Any = kube_config  # partly annotated: its loaders are untyped
        configuration = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG") or _default_kubeconfig()
        if path:
            try:
                config.load_kube_config(
                    config_file=path,
                    context=context,
                    client_configuration=configuration,
                    persist_config=False,
                )
                contexts, current = config.list_kube_config_contexts(path)
            except (config.ConfigException, OSError, ValueError) as exc:
                raise PermanentError(
                    f"cannot use kubeconfig {path} ({_first_line(exc)}): check the file, "
                    "--kubeconfig and --context (`kubectl config view` shows them)"
                ) from None
            chosen = next((c for c in contexts if c["name"] == context), current) or {}
            namespace = namespace or (chosen.get("context") or {}).get("namespace")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException as exc:
                raise PermanentError(f"cannot use the in-cluster ServiceAccount: {exc}") from None
            if not namespace and SA_NAMESPACE_FILE.is_file():
                namespace = SA_NAMESPACE_FILE.read_text().strip()
        else:
            raise PermanentError(
                "no Kubernetes credentials: set KUBECONFIG or --kubeconfig, or create "
                "~/.kube/config (`kubectl config view` shows what kubectl uses)"
            )
        api_client = client.ApiClient(configuration)
        return cls(api_client, namespace or DEFAULT_NAMESPACE, str(configuration.host))

    def close(self) -> None:
        self._api_client.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the commands ---------------------------------------------------------------------------

    def submit(self, job: dict[str, Any]) -> str:
        """Create the Job (in its own `metadata.namespace`, else ours); returns its name."""
        if job.get("kind") != "Job" or not job.get("metadata", {}).get("name"):
            raise PermanentError("submit: the manifest is not a named batch/v1 Job")
        meta = job["metadata"]
        name, namespace = meta["name"], meta.get("namespace") or self.namespace
        run_id = (meta.get("labels") or {}).get("app.kubernetes.io/instance", name)
        taken = (
            f"Job {name} already exists in namespace {namespace}: run id {run_id} is taken; "
            "set a new LORAFORGE_RUN_ID in the spec (or `loraforge cancel` the old Job)"
        )
        created = self._json(
            f"create Job {name} in namespace {namespace}",
            lambda: self._batch.create_namespaced_job(
                namespace, body=job, _preload_content=False, _request_timeout=TIMEOUT
            ),
            conflict=taken,
        )
        return str(created["metadata"]["name"])

    def create(self, obj: dict[str, Any]) -> str:
        """Create one rendered object (in its own namespace, else ours); returns its name.

        Jobs go through `submit`; the others a multi-node or sharded render adds: the headless
        Service and NetworkPolicy of an Indexed Job, and the Kubeflow TrainJob and PyTorchJob
        (custom resources: their operators must be installed)."""
        kind, meta = obj.get("kind"), obj.get("metadata") or {}
        if kind == "Job":
            return self.submit(obj)
        name, namespace = meta.get("name"), meta.get("namespace") or self.namespace
        request = self._creator(str(kind), str(obj.get("apiVersion")), namespace, obj)
        if request is None or not name:
            raise PermanentError(f"submit: cannot create a {kind} ({obj.get('apiVersion')})")
        run_id = (meta.get("labels") or {}).get("app.kubernetes.io/instance", name)
        taken = (
            f"{kind} {name} already exists in namespace {namespace}: run id {run_id} is taken; "
            "set a new LORAFORGE_RUN_ID in the spec (or delete the old objects)"
        )
        created = self._json(f"create {kind} {name} in namespace {namespace}", request, taken)
        return str(created["metadata"]["name"])

    def _creator(
        self, kind: str, api_version: str, namespace: str, obj: dict[str, Any]
    ) -> Callable[[], Any] | None:
        from kubernetes import client

        kwargs: dict[str, Any] = {"_preload_content": False, "_request_timeout": TIMEOUT}
        if kind == "Service":
            return lambda: self._core.create_namespaced_service(namespace, obj, **kwargs)
        if kind == "NetworkPolicy":
            net: Any = client.NetworkingV1Api(self._api_client)
            return lambda: net.create_namespaced_network_policy(namespace, obj, **kwargs)
        plural = CUSTOM_PLURALS.get(kind)
        if plural is None:
            return None
        group, version = api_version.split("/")
        custom: Any = client.CustomObjectsApi(self._api_client)
        return lambda: custom.create_namespaced_custom_object(
            group, version, namespace, plural, obj, **kwargs
        )

    def status(self, name: str) -> JobStatus:
        return job_status(self._read_job(name), self._pods(name))

    def wait(self, name: str, timeout_s: float | None = None, poll_s: float = 2.0) -> JobStatus:
        """Poll until the Job is Complete or Failed; `TransientError` after `timeout_s`.

        Polling reads the Job only; the pods are read once, at the end. Once the Job has been
        seen, up to `WAIT_RETRIES` consecutive unanswered polls are tolerated (an API server
        restart during a long run).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        misses = 0
        phase: Phase | None = None
        while True:
            try:
                phase = _phase(self._read_job(name), [])
                misses = 0
            except TransientError:
                misses += 1
                if phase is None or misses >= WAIT_RETRIES:  # never answered: wrong cluster?
                    raise
            if phase in ("Complete", "Failed"):
                return self.status(name)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransientError(
                    f"Job {name} not finished after {timeout_s:g} s: wait again with "
                    f"`loraforge wait {name}`, or stop it with `loraforge cancel {name}`"
                )
            time.sleep(poll_s if left is None else min(poll_s, left))

    def logs(
        self,
        name: str,
        follow: bool,
        out: TextIO,
        pod_timeout_s: float = 300.0,
        poll_s: float = 1.0,
    ) -> str:
        """Copy the log of the Job's newest pod to `out` (until its container ends if `follow`).

        Waits up to `pod_timeout_s` for a pod that has started. Returns the pod's name.
        """
        pod = self._started_pod(name, pod_timeout_s, poll_s)
        pod_name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]["name"]
        response = self._call(
            f"read the log of pod {pod_name}",
            lambda: self._core.read_namespaced_pod_log(
                pod_name,
                self.namespace,
                container=container,
                follow=follow,
                _preload_content=False,
                _request_timeout=STREAM_TIMEOUT if follow else TIMEOUT,
            ),
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:  # read1: whatever has arrived, so a followed log shows up as it is written
                chunk = self._call(f"read the log of pod {pod_name}", lambda: response.read1(65536))
                out.write(decoder.decode(chunk, final=not chunk))
                out.flush()
                if not chunk:
                    return str(pod_name)
        finally:
            response.release_conn()

    def cancel(self, name: str) -> None:
        """Delete the Job and its pods (foreground: the Job is visible until its pods are gone)."""
        from kubernetes import client

        options = client.V1DeleteOptions(propagation_policy="Foreground")
        self._json(
            f"delete Job {name}",
            lambda: self._batch.delete_namespaced_job(
                name, self.namespace, body=options, _preload_content=False, _request_timeout=TIMEOUT
            ),
            not_found=self._not_found(name),
        )

    def list_nodes(self) -> list[tuple[str, dict[str, str]]]:
        """Every node's name and labels (GPU Feature Discovery labels among them)."""
        nodes = self._json(
            "list nodes",
            lambda: self._core.list_node(_preload_content=False, _request_timeout=TIMEOUT),
            role="ClusterRole loraforge-gpu-reader",
        )
        return [
            (str(n["metadata"]["name"]), dict(n["metadata"].get("labels") or {}))
            for n in nodes.get("items") or []
        ]

    # -- requests -------------------------------------------------------------------------------

    def _read_job(self, name: str) -> dict[str, Any]:
        return self._json(
            f"read Job {name}",
            lambda: self._batch.read_namespaced_job(
                name, self.namespace, _preload_content=False, _request_timeout=TIMEOUT
            ),
            not_found=self._not_found(name),
        )

    def _pods(self, name: str) -> list[dict[str, Any]]:
        pods = self._json(
            f"list the pods of Job {name}",
            lambda: self._core.list_namespaced_pod(
                self.namespace,
                label_selector=f"job-name={name}",
                _preload_content=False,
                _request_timeout=TIMEOUT,
            ),
        )
        return list(pods.get("items") or [])

    def _started_pod(self, name: str, timeout_s: float, poll_s: float) -> dict[str, Any]:
        """The Job's newest pod once it has left Pending (its container has started)."""
        job = self._read_job(name)
        deadline = time.monotonic() + timeout_s
        while True:
            pods = sorted(
                self._pods(name), key=lambda p: p["metadata"].get("creationTimestamp", "")
            )
            if pods and (pods[-1].get("status") or {}).get("phase", "Pending") != "Pending":
                return pods[-1]
            if not pods and _phase(job, []) in ("Complete", "Failed"):
                raise PermanentError(f"Job {name} has ended and none of its pods is left")
            if time.monotonic() >= deadline:
                waiting = pod_status(pods[-1]) if pods else None
                why = (
                    f"pod {waiting.name} Pending ({waiting.reason or 'not scheduled yet'})"
                    if waiting
                    else "no pod yet"
                )
                raise TransientError(
                    f"Job {name} has no started pod after {timeout_s:g} s: {why}; "
                    f"see `loraforge status {name}`"
                )
            time.sleep(poll_s)

    def _not_found(self, name: str) -> str:
        return (
            f"no Job {name} in namespace {self.namespace} (cancelled, or removed "
            "ttlSecondsAfterFinished after it ended?); check --namespace and --context"
        )

    def _json(
        self,
        doing: str,
        request: Callable[[], Any],
        conflict: str | None = None,
        not_found: str | None = None,
        role: str = LAUNCHER_ROLE,
    ) -> dict[str, Any]:
        response = self._call(doing, request, conflict=conflict, not_found=not_found, role=role)
        try:
            data = self._call(doing, lambda: response.data)
        finally:
            response.release_conn()
        return cast(dict[str, Any], json.loads(data))

    def _call(
        self,
        doing: str,
        request: Callable[[], Any],
        conflict: str | None = None,
        not_found: str | None = None,
        role: str = LAUNCHER_ROLE,
    ) -> Any:
        """Run one request of the untyped client, turning its failures into our two errors.

        `conflict` and `not_found` are the messages for HTTP 409 and 404; `role` is the RBAC
        role that grants the request, named when the API server answers 403.
        """
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return request()
        except ApiException as exc:
            status = int(exc.status or 0)
            if status == 409 and conflict:
                raise PermanentError(conflict) from None
            if status == 404 and not_found:
                raise PermanentError(not_found) from None
            raise _api_error(doing, status, _status_message(exc), role) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(
                f"{doing}: cannot reach the Kubernetes API server at {self.server} "
                f"({_connection_reason(exc)}); check that the cluster is up and that "
                "KUBECONFIG/--context point at it"
            ) from None


def _api_error(doing: str, status: int, detail: str, role: str) -> LoraforgeError:
    if status == 401:
        return PermanentError(
            f"{doing}: the API server refused the credentials (HTTP 401: {detail}); "
            "log in again or refresh the kubeconfig's token"
        )
    if status == 403:
        return PermanentError(
            f"{doing}: forbidden by RBAC (HTTP 403: {detail}); bind {role} (k8s/base/rbac.yaml) "
            "to your user or ServiceAccount"
        )
    if status in (0, 429) or status >= 500:
        return TransientError(
            f"{doing}: the API server answered HTTP {status} ({detail}); try again"
        )
    return PermanentError(f"{doing}: the API server refused it (HTTP {status}: {detail})")


def _default_kubeconfig() -> str | None:
    path = Path.home() / ".kube" / "config"
    return str(path) if path.is_file() else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _status_message(exc: Any) -> str:
    """The `message` of the API's Status object in an error body, else the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(exc.reason or "no detail")


def _connection_reason(exc: BaseException) -> str:
    """`[Errno 111] Connection refused` rather than urllib3's pool and object reprs."""
    reason = getattr(exc, "reason", None) or exc
    return str(reason).rsplit(": ", 1)[-1] or type(exc).__name__
