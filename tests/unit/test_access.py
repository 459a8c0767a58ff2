"""Access rules and certificate identities, without a server."""
from __future__ import annotations

import pytest

from gateway.config import AccessRule
from gateway.errors import PermissionDenied, Unauthenticated
from gateway.security.access import Policy
from gateway.security.identity import Authenticator, cert_principal
from gateway.security.principal import Principal
from tests.certs import CertAuthority

RULES = [AccessRule.model_validate(r) for r in [
    {"name": "scoring", "principals": ["spiffe://example.org/ns/*/sa/scoring"], "models": ["fraud-*"], "actions": ["infer"]},
    {"name": "ops", "groups": ["ml-ops"], "actions": ["admin", "metadata"]},
    {"name": "risk", "claims": {"team": ["risk", "fraud"], "tier": "gold"}, "models": ["fraud-v2"], "actions": ["infer"]},
    {"name": "public", "anonymous": True, "models": ["echo"], "actions": ["infer", "metadata"]},
]]


def test_principal_globs_models_and_actions():
    policy = Policy(RULES)
    scoring = Principal("spiffe://example.org/ns/prod/sa/scoring", "cert")
    assert policy.rule_for(scoring, "fraud-v1", "infer") == "scoring"
    assert policy.rule_for(scoring, "fraud-v1", "metadata") is None
    assert policy.rule_for(scoring, "churn", "infer") is None
    with pytest.raises(PermissionDenied, match="may not use infer on model 'churn'"):
        policy.check(scoring, "churn", "infer")


def test_groups_claims_and_anonymous():
    policy = Policy(RULES)
    assert policy.rule_for(Principal("alice", "jwt", groups=frozenset({"ml-ops"})), "anything", "admin") == "ops"
    gold = Principal("svc", "jwt", claims={"team": ["growth", "risk"], "tier": "gold"})
    silver = Principal("svc", "jwt", claims={"team": "risk", "tier": "silver"})
    assert policy.rule_for(gold, "fraud-v2", "infer") == "risk"
    assert policy.rule_for(silver, "fraud-v2", "infer") is None
    assert policy.rule_for(None, "echo", "infer") == "public"
    assert policy.rule_for(silver, "echo", "infer") == "public"  # credentials never lose what anonymous has
    with pytest.raises(Unauthenticated, match="credentials required for infer on model 'fraud-v2'"):
        policy.check(None, "fraud-v2", "infer")


def test_no_rules_means_open_data_plane_and_closed_admin():
    policy = Policy(None)
    assert policy.rule_for(None, "m", "infer") == "open" and policy.rule_for(None, "m", "metadata") == "open"
    with pytest.raises(Unauthenticated, match="the admin API"):
        policy.check(None, "m", "admin")
    with pytest.raises(PermissionDenied):
        policy.check(Principal("root", "cert"), "m", "admin")
    assert Policy([]).rule_for(Principal("x", "cert"), "m", "infer") is None  # an empty list allows nothing


def test_a_rule_must_name_somebody():
    with pytest.raises(ValueError, match="names nobody"):
        AccessRule.model_validate({"name": "oops", "actions": ["infer"]})


def test_certificate_names_uri_then_dns_then_cn(tmp_path):
    ca = CertAuthority(tmp_path, "ca")
    both = ca.issue("both", cn="cn-name", uris=("spiffe://example.org/a",), dns=("a.example.org",))
    dns = ca.issue("dns", cn="cn-name", dns=("b.example.org",))
    cn = ca.issue("cn", cn="batch-job")
    assert cert_principal(both.cert.read_bytes()).name == "spiffe://example.org/a"
    assert cert_principal(dns.cert.read_bytes()).name == "b.example.org"
    assert cert_principal(cn.cert.read_bytes()).name == "batch-job"
    pem = cn.cert.read_bytes()
    assert cert_principal(pem) is cert_principal(pem)  # cached: one object per certificate


def test_without_an_issuer_the_authorization_header_is_ignored(tmp_path):
    cert = CertAuthority(tmp_path, "ca").issue("c", cn="svc").cert.read_bytes()
    assert Authenticator(None).identify(cert, "Bearer whatever").name == "svc"
    assert Authenticator(None).identify(None, "Bearer whatever") is None


def test_access_counter_caps_distinct_principals():
    """Every user of an OIDC issuer is a principal: past MAX_PRINCIPALS they are counted as `other`
    (in a child process: the metrics live in the process-wide registry)."""
    code = """
from prometheus_client import generate_latest
from gateway.observability.metrics import MAX_PRINCIPALS, Metrics
m = Metrics()
for i in range(MAX_PRINCIPALS + 50):
    m.access(f"user-{i}", "fraud", "infer", True)
lines = [l for l in generate_latest().decode().splitlines() if l.startswith("infergate_access_decisions_total{")]
print(len(lines), sum(float(l.rsplit(" ", 1)[1]) for l in lines if 'principal="other"' in l))
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert out == ["1001", "50.0"]
