"""deploy/kubernetes/ and deploy/Containerfile, checked offline.

The core objects are validated strictly (unknown fields are errors) against the Kubernetes
OpenAPI schemas bundled in ``kubernetes-validate`` (PyPI), for the oldest version the
manifests need (1.30: ``appArmorProfile``) and the newest bundled. The PodMonitor is checked
against the prometheus-operator CRD schema compiled into the npm package
``@kubernetes-models/prometheus-operator`` (.ci/run installs it under .ci/npm), which does
not reject unknown fields: the keys used are checked against the CRD's own field names here.
What the manifests claim about the agent (capabilities, flags, ports) is checked against the
agent: the flags parse with its CLI, the capabilities are the README's for ``--netns all``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from auditd.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
NPM_MODULES = ROOT / ".ci" / "npm" / "node_modules"
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
NETNS_ALL_CAPS = {"SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"}  # README "Privileges"
# Fields of the PodMonitor CRD (monitoring.coreos.com/v1) this project may use.
PODMONITOR_SPEC = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                   "podTargetLabels", "sampleLimit"}  # fmt: skip
POD_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "relabelings", "scheme",
                "metricRelabelings", "basicAuth", "tlsConfig", "honorLabels"}  # fmt: skip


def documents() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind in deploy/kubernetes/."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"{path.name}: a second {doc['kind']}"
            docs[doc["kind"]] = doc
    return docs


DOCS = documents()
CORE = sorted(k for k, d in DOCS.items() if "coreos.com" not in d["apiVersion"])


def test_every_object_is_there() -> None:
    assert set(DOCS) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service",
                         "PodMonitor"}  # fmt: skip
    for doc in DOCS.values():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == DOCS["Namespace"]["metadata"]["name"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", CORE)
def test_core_objects_match_the_kubernetes_schemas(kind: str, version: str) -> None:
    kubernetes_validate.validate(DOCS[kind], version, strict=True)


def test_the_strict_validator_rejects_what_it_should() -> None:
    bad = json.loads(json.dumps(DOCS["DaemonSet"]))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitys"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def _validate_crd(tmp_path: Path, *docs: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    if shutil.which("node") is None or not NPM_MODULES.is_dir():
        pytest.skip("needs node and .ci/npm (.ci/run: npm install @kubernetes-models/...)")
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"doc{i}.json")
        files[-1].write_text(json.dumps(doc))
    argv = ["node", str(ROOT / "tests" / "validate_crd.mjs"), str(NPM_MODULES), *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_podmonitor_matches_the_crd_schema(tmp_path: Path) -> None:
    monitor = DOCS["PodMonitor"]
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["podMetricsEndpoints"][0]["interval"] = 30  # a number, not a duration string
    proc = _validate_crd(tmp_path, monitor, bad)
    assert proc.stdout.splitlines()[0] == "ok PodMonitor keepalive-auditd", proc
    assert "interval must be string" in proc.stdout.splitlines()[1] and proc.returncode == 1
    assert set(monitor["spec"]) <= PODMONITOR_SPEC
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert set(endpoint) <= POD_ENDPOINT


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = DOCS["DaemonSet"]["spec"]["template"]
    return spec


def test_daemonset_has_the_least_privileges_for_netns_all() -> None:
    pod = _pod()["spec"]
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert set(ctx["capabilities"]["add"]) == NETNS_ALL_CAPS
    assert ctx["privileged"] is False and ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/run/netns"]["readOnly"] is True
    readme = (ROOT / "README.md").read_text()
    for cap in NETNS_ALL_CAPS:
        assert f"CAP_{cap}" in readme


def test_daemonset_flags_parse_and_its_ports_and_labels_line_up() -> None:
    (container,) = _pod()["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "run" and args.netns == "all"
    port = args.listen.rpartition(":")[2]
    (named,) = container["ports"]
    assert str(named["containerPort"]) == port and named["name"] == "metrics"
    assert DOCS["Service"]["spec"]["ports"][0]["targetPort"] == named["name"]
    assert DOCS["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == named["name"]
    labels = _pod()["metadata"]["labels"]
    for selector in (DOCS["DaemonSet"]["spec"]["selector"]["matchLabels"],
                     DOCS["PodMonitor"]["spec"]["selector"]["matchLabels"],
                     DOCS["Service"]["spec"]["selector"]):  # fmt: skip
        assert selector.items() <= labels.items()
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(args.config_file).parent) in mounted


def test_configmap_holds_the_shipped_rules() -> None:
    shipped = (ROOT / "config" / "rules.yaml").read_text()
    assert DOCS["ConfigMap"]["data"]["rules.yaml"] == shipped


def test_containerfile_installs_the_project_and_runs_the_agent() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms and all("python:3" in f and "-slim" in f for f in froms)
    assert 'ENTRYPOINT ["keepalive-auditd"]' in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
    args = build_parser().parse_args(json.loads(cmd[len("CMD ") :]))
    assert args.command == "run" and args.netns == "all"
