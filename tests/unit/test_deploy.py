"""deploy/ and the Dockerfile, checked offline: both kustomize overlays render (scripts/kubectl.sh),
every rendered document validates against the Kubernetes 1.30 JSON schemas bundled with
kubernetes-validate (strict: unknown fields fail), and the manifests agree with the code and with
each other — probes, users, network policy, config copies, drain timing, Dockerfile stages.
Nothing here talks to a cluster or a Docker daemon."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import warnings
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway import config
from gateway.audit.chain import create_key
from tests.certs import CertAuthority

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.30.0"          # schemas bundled with kubernetes-validate; no network
OVERLAYS = ("dev", "prod")
GATEWAY = {"app.kubernetes.io/name": "infergate", "app.kubernetes.io/component": "gateway"}
REGISTRY_SYNC = {"app.kubernetes.io/name": "infergate", "app.kubernetes.io/component": "registry-sync"}
RESYNC = "run deploy/sync-configs.sh"


# --- rendering -----------------------------------------------------------------------------------

def kustomize(path: Path) -> list[dict]:
    """`kustomize build` through scripts/kubectl.sh; skips, loudly, when no kustomize can be had."""
    try:
        done = subprocess.run([str(ROOT / "scripts" / "kubectl.sh"), "kustomize", str(path)],
                              capture_output=True, text=True, timeout=600)
    except OSError as e:  # e.g. no bash
        done = subprocess.CompletedProcess([], 3, "", f"scripts/kubectl.sh did not run: {e}")
    if done.returncode == 3:
        reason = f"NOT CHECKED: deploy/ manifests not rendered, no kustomize: {done.stderr.strip()}"
        warnings.warn(reason)
        pytest.skip(reason)
    assert done.returncode == 0, f"kustomize {path.relative_to(ROOT)} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: kustomize(DEPLOY / "overlays" / overlay) for overlay in OVERLAYS}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in pod(deployment)["containers"] if c["name"] == name)


def mounts(c: dict) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}


def volume(deployment: dict, name: str) -> dict:
    return next(v for v in pod(deployment)["volumes"] if v["name"] == name)


def mounted(deployment: dict, c: dict, path: str) -> tuple[dict, str]:
    """The volume holding path in container c, and path relative to the mount."""
    at = mounts(c)
    directory = next(p for p in sorted(at, key=len, reverse=True) if Path(path).is_relative_to(p))
    return volume(deployment, at[directory]), str(Path(path).relative_to(directory))


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def cluster_gateway_config() -> dict:
    return yaml.safe_load((DEPLOY / "base" / "config" / "gateway.yaml").read_text())


# --- schemas -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_document_validates(rendered, overlay):
    docs = rendered[overlay]
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget",
            "PersistentVolumeClaim"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")


def test_prometheus_kustomization_renders_the_rules_unchanged():
    docs = kustomize(DEPLOY / "prometheus")
    rules = one(docs, "ConfigMap", "infergate-prometheus-rules")   # fixed name, for a Prometheus to mount
    kubernetes_validate.validate(rules, KUBERNETES, strict=True)
    assert rules["data"]["infergate-rules.yml"] == (ROOT / "configs/prometheus/infergate-rules.yml").read_text()


# --- the gateway ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_and_scrape_annotations_use_the_admin_port(rendered, overlay):
    gw = one(rendered[overlay], "Deployment", "infergate")
    c = container(gw, "gateway")
    admin = cluster_gateway_config()["listeners"]["admin"]["port"]
    assert {"name": "admin", "containerPort": admin} in c["ports"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "admin"}
    assert c["startupProbe"]["httpGet"]["port"] == "admin"
    notes = gw["spec"]["template"]["metadata"]["annotations"]
    assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": str(admin), "prometheus.io/path": "/metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_name_their_ports_and_grpc_is_grpc(rendered, overlay):
    docs = rendered[overlay]
    gw = one(docs, "Deployment", "infergate")
    ports = {p["name"]: p["containerPort"] for p in container(gw, "gateway")["ports"]}
    listeners = cluster_gateway_config()["listeners"]
    assert ports == {name: listeners[name]["port"] for name in ("http", "grpc", "admin")}
    for name in ("infergate", "infergate-headless"):
        service = one(docs, "Service", name)
        assert service["spec"]["selector"] == GATEWAY            # never registry-sync's pods
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]
            assert p["appProtocol"] == ("grpc" if p["name"] == "grpc" else "http")
    assert one(docs, "Service", "infergate-headless")["spec"]["clusterIP"] == "None"
    triton = one(docs, "Service", "triton")
    assert {p["name"]: p.get("appProtocol") for p in triton["spec"]["ports"]}["grpc"] == "grpc"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_and_the_gateway_on_a_read_only_root(rendered, overlay):
    deployments = find(rendered[overlay], "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"infergate", "infergate-registry-sync", "triton"}
    for d in deployments:
        spec = pod(d)
        assert spec["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
            assert c.get("securityContext", {}).get("runAsUser", 1) != 0
    # Triton's own container too where it runs the triton-cpu image (tried off-cluster; NVIDIA's is not)
    read_only = ["infergate", "infergate-registry-sync"] + (["triton"] if overlay == "dev" else [])
    for name in read_only:
        d = one(deployments, "Deployment", name)
        for c in pod(d)["containers"] + pod(d).get("initContainers", []):
            if name != "triton" or c["name"] == "triton":
                assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
    triton = one(deployments, "Deployment", "triton")
    scratch = mounts(container(triton, "triton"))
    assert "emptyDir" in volume(triton, scratch["/tmp"]) and volume(triton, scratch["/dev/shm"])["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_the_gateway_writes_or_reads_is_mounted(rendered, overlay):
    """The config on a read-only root: state file, audit dir, numba's cache and /tmp on emptyDirs; the
    config from ConfigMaps without subPath (so updates arrive); TLS and the audit key from Secrets."""
    gw = one(rendered[overlay], "Deployment", "infergate")
    c = container(gw, "gateway")
    at = mounts(c)
    cfg = cluster_gateway_config()
    config_file = Path(c["args"][c["args"].index("--config") + 1])
    base = config_file.parent
    assert at[str(base)] == "config"
    assert not any("subPath" in m for m in c["volumeMounts"])

    for writable in (str(Path(cfg["state_file"]).parent), cfg["audit"]["dir"], "/tmp"):
        assert "emptyDir" in mounted(gw, c, writable)[0], writable
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["NUMBA_CACHE_DIR"] == dockerfile_env("gateway")["NUMBA_CACHE_DIR"]
    assert "emptyDir" in mounted(gw, c, env["NUMBA_CACHE_DIR"])[0]
    seed = next(i for i in pod(gw)["initContainers"] if i["name"] == "numba-cache")
    assert env["NUMBA_CACHE_DIR"] in seed["command"][-1] and mounts(seed) == {"/seed": "numba-cache"}
    for relative in (cfg["tls"]["cert"], cfg["tls"]["key"], cfg["tls"]["client_ca"]):
        assert mounted(gw, c, os.path.normpath(base / relative))[0]["secret"]["secretName"] == "infergate-tls"
    key = mounted(gw, c, os.path.normpath(base / cfg["audit"]["signing_key"]))[0]
    assert key["secret"]["secretName"] == "infergate-audit-key"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_routing_configmap_keeps_its_name_so_updates_reload_live(rendered, overlay):
    docs = rendered[overlay]
    routing = one(docs, "ConfigMap", "infergate-routing")      # no hash suffix
    assert set(routing["data"]) == {"routing.yaml"}
    settings = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("infergate-config-")]
    assert len(settings) == 1 and set(settings[0]["data"]) == {"gateway.yaml"}   # hashed: a change rolls pods
    assert yaml.safe_load(settings[0]["data"]["gateway.yaml"])["routing_file"] == "routing.yaml"
    sources = volume(one(docs, "Deployment", "infergate"), "config")["projected"]["sources"]
    assert [s["configMap"]["name"] for s in sources] == [settings[0]["metadata"]["name"], "infergate-routing"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_pre_stop_drain_and_the_audit_flush(rendered, overlay):
    gw = one(rendered[overlay], "Deployment", "infergate")
    pre_stop = container(gw, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = cluster_gateway_config()["drain_timeout_s"]
    # sleep, then drain_timeout_s for requests, then up to drain_timeout_s for the audit writer's close
    assert pod(gw)["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + 2 * drain + 5


def test_replicas_budget_and_autoscaler_per_overlay(rendered):
    prod, dev = rendered["prod"], rendered["dev"]
    assert one(prod, "Deployment", "infergate")["spec"]["replicas"] == 3
    hpa = one(prod, "HorizontalPodAutoscaler", "infergate")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "infergate"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one(prod, "PodDisruptionBudget", "infergate")["spec"]
    assert pdb["minAvailable"] == 2 and "maxUnavailable" not in pdb and pdb["selector"]["matchLabels"] == GATEWAY
    assert one(dev, "Deployment", "infergate")["spec"]["replicas"] == 1
    assert not find(dev, "HorizontalPodAutoscaler")
    assert one(dev, "PodDisruptionBudget", "infergate")["spec"]["maxUnavailable"] == 1   # never blocks a drain


def test_prod_routes_do_not_open_the_admin_api_to_anonymous_callers(rendered):
    routing = yaml.safe_load(one(rendered["prod"], "ConfigMap", "infergate-routing")["data"]["routing.yaml"])
    assert routing["models"]
    assert not [r for r in routing["access"] if r.get("anonymous") and "admin" in r["actions"]]


# --- Triton, its network policy, registry-sync ---------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_and_registry_sync_reach_triton(rendered, overlay):
    docs = rendered[overlay]
    labels = {name: one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
              for name in ("triton", "infergate", "infergate-registry-sync")}
    policies = [p for p in find(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], labels["triton"])]
    assert [p["metadata"]["name"] for p in policies] == ["triton-ingress"]
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert not selects(spec["podSelector"]["matchLabels"], labels["infergate"])
    peers = [peer for rule in spec["ingress"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in peers)          # no namespace or IP block
    selectors = [peer["podSelector"]["matchLabels"] for peer in peers]
    assert selectors == [GATEWAY, REGISTRY_SYNC]
    assert selects(GATEWAY, labels["infergate"]) and selects(REGISTRY_SYNC, labels["infergate-registry-sync"])
    assert not selects(GATEWAY, labels["infergate-registry-sync"]) and not selects(REGISTRY_SYNC, labels["infergate"])
    admitted = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    served = {p["containerPort"] for p in container(one(docs, "Deployment", "triton"), "triton")["ports"]}
    assert admitted == served == {8000, 8001, 8002}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_and_registry_sync_share_the_model_repository(rendered, overlay):
    docs = rendered[overlay]
    triton, sync = one(docs, "Deployment", "triton"), one(docs, "Deployment", "infergate-registry-sync")
    t, s = container(triton, "triton"), container(sync, "registry-sync")
    assert "--model-control-mode=explicit" in t["args"]
    repository = next(a.split("=", 1)[1] for a in t["args"] if a.startswith("--model-repository="))
    settings = yaml.safe_load((DEPLOY / "base/config/registry-sync.yaml").read_text())
    assert settings["repository"] == repository            # one path in both pods
    for deployment, c in ((triton, t), (sync, s)):
        claim, inside = mounted(deployment, c, repository)
        assert claim["persistentVolumeClaim"]["claimName"] == "triton-models" and inside == "models"
        init = next(i for i in pod(deployment)["initContainers"] if i["name"] == "repository")
        assert init["command"] == ["mkdir", "-p", "-m", "2775", repository]      # a fresh volume has none
    registry, _ = mounted(sync, s, settings["registry"]["path"])
    assert registry["persistentVolumeClaim"] == {"claimName": "model-registry", "readOnly": True}
    assert s["command"] == ["infergate", "registry", "sync", "--config", "/etc/infergate/registry-sync.yaml"]
    config_volume, name = mounted(sync, s, "/etc/infergate/registry-sync.yaml")
    sources = config_volume["projected"]["sources"]
    assert name in one(docs, "ConfigMap", sources[0]["configMap"]["name"])["data"]
    assert sources[1] == {"secret": {"name": "registry-sync-keys"}}        # the keys, beside the config
    for key in [*settings["signers"].values(), *settings["approvers"].values()]:
        assert "/" not in key
    assert sync["spec"]["strategy"]["type"] == "Recreate"                   # never two writers
    assert pod(triton)["securityContext"]["fsGroup"] == pod(sync)["securityContext"]["fsGroup"]
    assert pod(triton)["securityContext"]["runAsUser"] == dockerfile_uid("triton-cpu")
    for deployment in ("infergate", "infergate-registry-sync"):
        assert pod(one(docs, "Deployment", deployment))["securityContext"]["runAsUser"] == dockerfile_uid("gateway")


def test_registry_sync_runs_in_prod_and_not_in_dev(rendered):
    """In dev it would remove the seeded example models, which its state does not record."""
    assert one(rendered["prod"], "Deployment", "infergate-registry-sync")["spec"]["replicas"] == 1
    assert one(rendered["dev"], "Deployment", "infergate-registry-sync")["spec"]["replicas"] == 0


# --- the copies of configs/ ----------------------------------------------------------------------

@pytest.mark.parametrize("copy, original", [
    ("base/config/routing.yaml", "configs/routing.yaml"),
    ("prometheus/infergate-rules.yml", "configs/prometheus/infergate-rules.yml"),
])
def test_config_copies_equal_configs(copy, original):
    assert (DEPLOY / copy).read_bytes() == (ROOT / original).read_bytes(), f"deploy/{copy} differs from {original}: {RESYNC}"


def test_prod_routing_is_the_example_without_the_demo_admin_rule():
    lines = (ROOT / "configs/routing.yaml").read_text().splitlines(keepends=True)
    expected = "".join(line for line in lines if "name: demo-admin" not in line)
    assert len(expected) < sum(map(len, lines)), "configs/routing.yaml no longer has the demo-admin rule: update sync-configs.sh"
    assert (DEPLOY / "overlays/prod/routing.yaml").read_text() == expected, RESYNC


def test_cluster_gateway_config_differs_from_the_example_only_where_a_cluster_must():
    example = yaml.safe_load((ROOT / "configs/gateway.yaml").read_text())
    cluster = cluster_gateway_config()
    assert cluster["backends"]["triton"].pop("url") == "triton:8001"       # the Service in triton.yaml
    example["backends"]["triton"].pop("url")
    assert cluster.pop("outcomes")["url"].startswith("sqlite:////var/lib/infergate/")  # a writable volume
    example.pop("outcomes")
    for key in ("state_file", "tls", "audit"):                            # commented out in the example
        cluster.pop(key)
        example.pop(key, None)
    assert cluster == example, "deploy/base/config/gateway.yaml drifted from configs/gateway.yaml"


def test_cluster_gateway_config_loads_as_check_config_does(tmp_path):
    """The files laid out as the pod mounts them, with a certificate and key where the Secrets go."""
    (tmp_path / "config").mkdir()
    for name in ("gateway.yaml", "routing.yaml"):
        (tmp_path / "config" / name).write_bytes((DEPLOY / "base/config" / name).read_bytes())
    tls = tmp_path / "tls"
    tls.mkdir()
    ca = CertAuthority(tls, "cluster")
    server = ca.issue("server", dns=("infergate",), server=True)
    server.cert.rename(tls / "tls.crt")
    server.key.rename(tls / "tls.key")
    ca.pem.rename(tls / "ca.crt")
    (tmp_path / "audit-key").mkdir()
    create_key(tmp_path / "audit-key" / "signing-key.pem")
    loaded = config.load(tmp_path / "config" / "gateway.yaml")
    assert loaded.gateway.tls.client_auth == "require"
    assert str(loaded.state_path).startswith("/var/lib/infergate/state/")


def test_cluster_registry_sync_config_differs_from_the_example_only_where_a_cluster_must():
    example_path = ROOT / "configs/registry-sync.yaml"
    if not example_path.exists():
        pytest.skip("NOT CHECKED: configs/registry-sync.yaml is missing")
    example = yaml.safe_load(example_path.read_text())
    cluster = yaml.safe_load((DEPLOY / "base/config/registry-sync.yaml").read_text())
    assert cluster["triton"] == "triton:8001"
    for doc in (example, cluster):
        for key in ("repository", "triton"):
            doc.pop(key)
        doc["registry"].pop("path")
        for section in ("signers", "approvers"):        # the same names; files of the Secret here
            doc[section] = sorted(doc.get(section, {}))
        for model in doc["models"].values():
            if model.get("canary"):
                admin = model["canary"].pop("admin")
                assert doc is example or admin == "http://infergate:9002"
    assert cluster == example, "deploy/base/config/registry-sync.yaml drifted from configs/registry-sync.yaml"


def test_cluster_registry_sync_config_parses_as_registry_sync_does():
    settings = pytest.importorskip("gateway.registry.settings")
    config.parse_file(DEPLOY / "base/config/registry-sync.yaml", settings.SyncConfig)


def test_scrape_config_finds_the_gateway_pods(rendered):
    scrape = yaml.safe_load((DEPLOY / "prometheus/scrape-config.yml").read_text())["scrape_configs"]
    assert [job["job_name"] for job in scrape] == ["infergate"]          # InfergateDown names the job
    relabel = scrape[0]["relabel_configs"]
    gw = one(rendered["prod"], "Deployment", "infergate")
    template = gw["spec"]["template"]["metadata"]
    keep = relabel[0]
    assert keep["action"] == "keep"
    values = [template["annotations"]["prometheus.io/scrape"], template["labels"]["app.kubernetes.io/name"],
              template["labels"]["app.kubernetes.io/component"]]
    assert re.fullmatch(keep["regex"], ";".join(values))
    registry_sync = one(rendered["prod"], "Deployment", "infergate-registry-sync")["spec"]["template"]["metadata"]
    assert not re.fullmatch(keep["regex"], ";".join(["true", *[registry_sync["labels"][k] for k in GATEWAY]]))
    assert relabel[1]["regex"] in {p["name"] for p in container(gw, "gateway")["ports"]}
    assert scrape[0]["kubernetes_sd_configs"][0]["namespaces"]["names"] == [gw["metadata"]["namespace"]]


# --- the Dockerfile ------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, [(INSTRUCTION, arguments)]) in order; continuation lines joined, comments dropped."""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    logical = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            word, _, rest = logical.strip().partition(" ")
            word = word.upper()
            if word == "FROM":
                parts = rest.split()
                stages.append((parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else "", []))
            stages[-1][1].append((word, rest.strip()))
        logical = ""
    return stages


def stage(name: str) -> list[tuple[str, str]]:
    return dict(dockerfile())[name]


def dockerfile_uid(name: str) -> int:
    """The uid of the user a stage runs as: USER names one made by `useradd --uid N` in that stage."""
    users = [rest for word, rest in stage(name) if word == "USER"]
    assert users, f"stage {name} has no USER"
    user = users[-1]
    for word, rest in stage(name):
        if word == "RUN" and "useradd" in rest:
            args = shlex.split(rest)
            if args[-1] == user:
                return int(args[args.index("--uid") + 1])
    return int(user)


def dockerfile_env(name: str) -> dict[str, str]:
    env = {}
    for word, rest in stage(name):
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_dockerfile_builds_the_gateway_by_default_and_triton_cpu_by_target():
    names = [name for name, _ in dockerfile()]
    assert names == ["build", "triton-cpu", "gateway"]      # the last stage is what `docker build .` makes
    copied_from = {rest.split()[0].split("=", 1)[1] for _, instructions in dockerfile()
                   for word, rest in instructions if word == "COPY" and rest.startswith("--from=")}
    assert copied_from == {"build"}                          # the others are images people run


@pytest.mark.parametrize("name, ports", [("gateway", {9000, 9001, 9002}), ("triton-cpu", {8000, 8001, 8002})])
def test_dockerfile_images_run_as_non_root_with_a_healthcheck(name, ports):
    instructions = stage(name)
    words = [w for w, _ in instructions]
    user = [rest for word, rest in instructions if word == "USER"][-1]
    assert user not in ("root", "0") and dockerfile_uid(name) > 0
    assert "USER" not in words[words.index("USER") + 1:]      # one switch, never back
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    assert exposed == ports
    checks = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "CMD" in checks[0]


def test_dockerfile_ports_and_paths_match_the_configs():
    listeners = yaml.safe_load((ROOT / "configs/gateway.yaml").read_text())["listeners"]
    gw = stage("gateway")
    health = next(rest for word, rest in gw if word == "HEALTHCHECK")
    assert f"127.0.0.1:{listeners['admin']['port']}/ready" in health
    assert {int(p) for w, r in gw if w == "EXPOSE" for p in r.split()} == {v["port"] for v in listeners.values()}
    # the kernels are compiled as the runtime user into the directory numba will use at run time
    words = [w for w, _ in gw]
    warm = next(i for i, (w, r) in enumerate(gw) if w == "RUN" and "warm_up" in r)
    assert words.index("USER") < warm and "NUMBA_CACHE_DIR" in dockerfile_env("gateway")
    triton = stage("triton-cpu")
    assert ("COPY", "models /models") in triton
    assert any(w == "CMD" and "--model-repository=/models" in r for w, r in triton)
    assert any(w == "RUN" and "scripts/triton-cpu.sh install" in r for w, r in triton)
    env = dockerfile_env("triton-cpu")
    assert env["PATH"].startswith("/opt/triton-venv/bin:")                   # trap 2 of triton-cpu.sh
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/usr/local/lib"          # trap 1, checked at build too
