"""The TLS front of the prod overlay (k8s/overlays/prod/front.yaml): a Gateway API Gateway with one HTTPS listener
terminating TLS with the Secret diffguard-tls, and an HTTPRoute from it to KubeRay's Serve Service, with a timeout
longer than the longest request. kubernetes-validate has no Gateway API schemas and none is available offline here,
so the structure is checked field by field (apiVersion v1, the fields GA in Gateway API v1.2: listeners, tls,
parentRefs, backendRefs, timeouts), with unknown fields refused."""

from __future__ import annotations

import re

from k8s import grace
from tests.unit.k8s_support import one, rendered

GATEWAY_FIELDS = {"gatewayClassName", "listeners"}
LISTENER_FIELDS = {"name", "protocol", "port", "hostname", "tls", "allowedRoutes"}
ROUTE_FIELDS = {"parentRefs", "hostnames", "rules"}
RULE_FIELDS = {"matches", "backendRefs", "timeouts"}
DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")  # Gateway API's Duration (GEP-2257)


def front() -> tuple[dict, dict]:
    (gateway,) = [r for r in rendered("prod") if r["kind"] == "Gateway"]
    (route,) = [r for r in rendered("prod") if r["kind"] == "HTTPRoute"]
    return gateway, route


def test_the_gateway_listens_only_on_https_with_the_certificate_secret():
    gateway, _ = front()
    assert gateway["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert set(gateway["spec"]) == GATEWAY_FIELDS and gateway["spec"]["gatewayClassName"]
    (listener,) = gateway["spec"]["listeners"]  # no plain-HTTP listener: the bearer key never travels in clear
    assert set(listener) <= LISTENER_FIELDS
    assert (listener["protocol"], listener["port"]) == ("HTTPS", 443)
    assert listener["tls"] == {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": "diffguard-tls"}]}
    assert listener["allowedRoutes"] == {"namespaces": {"from": "Same"}}


def test_the_route_goes_to_the_serve_service_with_a_timeout_past_the_longest_request():
    gateway, route = front()
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and set(route["spec"]) == ROUTE_FIELDS
    (listener,) = gateway["spec"]["listeners"]
    assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"], "sectionName": listener["name"]}]
    assert route["spec"]["hostnames"] == [listener["hostname"]]
    service = one("prod", "RayService")
    (rule,) = route["spec"]["rules"]
    assert set(rule) == RULE_FIELDS
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    serve = service["spec"]["serveService"]
    assert rule["backendRefs"] == [{"name": serve["metadata"]["name"], "port": serve["spec"]["ports"][0]["port"]}]
    assert set(rule["timeouts"]) == {"request"} and DURATION.match(rule["timeouts"]["request"])
    g = grace.production()
    assert int(rule["timeouts"]["request"].removesuffix("s")) > g.longest_request_s  # > generator + checker


def test_the_serve_port_admits_the_gateways_own_proxies():
    gateway, _ = front()
    (policy,) = [r for r in rendered("prod") if r["kind"] == "NetworkPolicy"]
    peers = [
        p
        for rule in policy["spec"]["ingress"]
        for p in rule["from"]
        if {"port": 8000, "protocol": "TCP"} in rule.get("ports", [])
    ]
    wanted = {"podSelector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": gateway["metadata"]["name"]}}}
    assert wanted in peers, peers
