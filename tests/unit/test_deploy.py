"""deploy/k8s: every overlay renders (`kubectl kustomize`) and every object validates against
the Kubernetes schemas (kubernetes-validate, strict); the commands the pods run parse with
the runtime's own CLI; probes hit endpoints that exist; the HPA's metric is one the gateway
exports."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from runtime.cli import build_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
KUBE_VERSION = "1.30.0"
GATEWAY_PATHS = {"/health", "/livez", "/metrics"}
WORKER_PATHS = {"/livez", "/readyz"}


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service"} <= kinds
    for d in docs:
        kv.validate(d, KUBE_VERSION, strict=True)  # raises on any schema error


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_real_commands_and_probe_real_endpoints(overlay: str) -> None:
    parser = build_parser()
    for d in render(overlay):
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        args = [re.sub(r"\$\((\w+)\)", "10.0.0.1", a) for a in c["args"]]  # Kubernetes expands $(POD_IP)
        ns = parser.parse_args(args)
        paths = GATEWAY_PATHS if ns.command == "controller" else WORKER_PATHS
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] in paths and get["port"] in ports, (d["metadata"]["name"], probe, get)
        if ns.command == "worker":
            assert ports["probes"] == ns.health_port and ns.curve_keys and "nvidia.com/gpu" in c["resources"]["limits"]
            assert spec["terminationGracePeriodSeconds"] > ns.drain_timeout  # the drain ends before SIGKILL
        else:
            assert ns.curve_keys and ports["controller"] == int(ns.listen.rsplit(":", 1)[1])
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["curve-keys"] == ns.curve_keys
        secret = next(v for v in spec["volumes"] if v["name"] == "curve-keys")["secret"]
        assert secret["secretName"] == "runtime-curve-keys"


def test_hpa_scales_on_an_exported_metric() -> None:
    from runtime.tokenizer.metrics import GatewayMetrics

    hpas = [d for d in render("disaggregated") if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpas
    m = GatewayMetrics()
    m.update_cluster([{"role": "decode", "alive": True, "queued": 3, "running": 1},
                      {"role": "decode", "alive": True, "queued": 2, "running": 0}], {})
    text = m.render().decode()
    for h in hpas:
        metric = h["spec"]["metrics"][0]["external"]["metric"]
        labels = ",".join(f'{k}="{v}"' for k, v in metric["selector"]["matchLabels"].items())
        assert f"{metric['name']}{{{labels}}} 5.0" in text
