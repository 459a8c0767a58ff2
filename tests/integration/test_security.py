"""Edge security end to end: real gateways with TLS and mutual TLS (certificates made here),
client certificates and JWTs as identities, access rules on inference, metadata and the admin
API, certificate rotation under load, and TLS from the gateway to a real Triton."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.protocol.wire import pb, pb_grpc
from tests.certs import CertAuthority, Issued
from tests.conftest import ROOT, metric

ISSUER, AUDIENCE = "https://idp.infergate.test/", "infergate"
SCORING = "spiffe://infergate.test/ns/prod/sa/scoring"
ACCESS = [
    {"name": "scoring", "principals": [SCORING], "models": ["double"], "actions": ["infer", "metadata"]},
    {"name": "batch", "principals": ["batch-job"], "models": ["double"], "actions": ["metadata"]},
    {"name": "ops", "groups": ["ml-ops"], "actions": ["admin", "metadata"]},
    {"name": "risk-team", "claims": {"team": "risk"}, "models": ["double"], "actions": ["infer"]},
]
ROUTES = {"double": {"target": {"backend": "triton", "model": "double"}},
          "classifier": {"target": {"backend": "triton", "model": "classifier", "version": 2}}}


@dataclass
class Pki:
    directory: Path
    server_ca: CertAuthority
    clients_ca: CertAuthority
    server: Issued
    scoring: Issued      # URI SAN (SPIFFE id), allowed to infer on double
    nobody: Issued       # DNS SAN, no rule names it
    batch: Issued        # CN only, metadata on double
    expired: Issued
    foreign: Issued      # the scoring id, signed by a CA the gateway does not trust
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey

    def token(self, key: str = "rsa", **claims: object) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-a", "iat": now, "exp": now + 300, **claims}
        signer, alg, kid = (self.rsa_key, "RS256", "rsa-1") if key == "rsa" else (self.ec_key, "ES256", "ec-1")
        return jwt.encode(body, signer, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    server_ca, clients_ca, other = CertAuthority(d, "server"), CertAuthority(d, "clients"), CertAuthority(d, "other")
    rsa_key, ec_key = rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())
    keys = [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rsa-1", "use": "sig"},
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "ec-1", "use": "sig"}]
    (d / "jwks.json").write_text(json.dumps({"keys": keys}))
    return Pki(d, server_ca, clients_ca,
               server=server_ca.issue("server", cn="infergate", dns=("localhost",), ips=("127.0.0.1",), server=True),
               scoring=clients_ca.issue("scoring", uris=(SCORING,)),
               nobody=clients_ca.issue("nobody", dns=("nobody.infergate.test",)),
               batch=clients_ca.issue("batch", cn="batch-job"),
               expired=clients_ca.issue("expired", uris=(SCORING,), expired=True),
               foreign=other.issue("foreign", uris=(SCORING,)),
               rsa_key=rsa_key, ec_key=ec_key)


def tls_section(pki: Pki, directory: Path, client_auth: str = "require") -> dict:
    """A gateway's tls section over its own copies of the files (so a test can rotate them)."""
    for name, source in (("server.pem", pki.server.cert), ("server.key", pki.server.key), ("clients.pem", pki.clients_ca.pem)):
        shutil.copy(source, directory / name)
    return {"cert": str(directory / "server.pem"), "key": str(directory / "server.key"),
            "client_ca": str(directory / "clients.pem"), "client_auth": client_auth, "reload_s": 0.2}


def jwt_section(pki: Pki) -> dict:
    return {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(pki.directory / "jwks.json")}}


@pytest.fixture(scope="module")
def mtls_gateway(triton, module_launcher, pki, tmp_path_factory):
    """mTLS required on gRPC and HTTP, JWTs accepted, the ACCESS rules; admin stays plaintext."""
    files = tmp_path_factory.mktemp("mtls")
    return module_launcher.start(triton.grpc_url, routes=ROUTES, access=ACCESS,
                                 tls=tls_section(pki, files), auth=jwt_section(pki))


def grpc_stub(gw, pki: Pki, client: Issued | None, trust: Path | None = None) -> pb_grpc.GRPCInferenceServiceStub:
    creds = grpc.ssl_channel_credentials((trust or pki.server_ca.pem).read_bytes(),
                                         client.key.read_bytes() if client else None,
                                         client.cert.read_bytes() if client else None)
    return pb_grpc.GRPCInferenceServiceStub(grpc.secure_channel(f"127.0.0.1:{gw.grpc_port}", creds))


def double_request(model: str = "double") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return request


def grpc_code(stub, model: str = "double", token: str | None = None) -> grpc.StatusCode:
    try:
        stub.ModelInfer(double_request(model), timeout=5, metadata=(("authorization", f"Bearer {token}"),) if token else None)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def https_status(gw, pki: Pki, client: Issued | None, path: str = "/v2/models/double/infer",
                 headers: dict | None = None, trust: Path | None = None) -> int | str:
    """The HTTP status over TLS, or 'handshake' when the TLS handshake was refused."""
    context = ssl.create_default_context(cafile=trust or pki.server_ca.pem)
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    body = b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
    connection = http.client.HTTPSConnection("127.0.0.1", gw.http_port, context=context, timeout=5)
    try:
        connection.request("POST" if path.endswith("/infer") else "GET", path, body if path.endswith("/infer") else None,
                           headers or {})
        return connection.getresponse().status
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return "handshake"
    finally:
        connection.close()


def test_client_certificates_name_the_caller_over_grpc(mtls_gateway, pki):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{mtls_gateway.grpc_port}", ssl=True,
                                              root_certificates=str(pki.server_ca.pem),
                                              private_key=str(pki.scoring.key), certificate_chain=str(pki.scoring.cert))
    tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    assert client.infer("double", [tensor]).as_numpy("OUTPUT0").tolist() == [[0, 2, 4, 6]]
    with pytest.raises(Exception, match="may not use infer on model 'classifier'"):
        client.infer("classifier", [tensor])
    assert grpc_code(grpc_stub(mtls_gateway, pki, pki.nobody)) == grpc.StatusCode.PERMISSION_DENIED
    batch = grpc_stub(mtls_gateway, pki, pki.batch)  # CN-only certificate: metadata yes, inference no
    assert batch.ModelMetadata(pb.ModelMetadataRequest(name="double"), timeout=5).name == "double"
    assert grpc_code(batch) == grpc.StatusCode.PERMISSION_DENIED
    # no certificate, one from another CA, an expired one: the handshake itself is refused
    for refused in (None, pki.foreign, pki.expired):
        assert grpc_code(grpc_stub(mtls_gateway, pki, refused)) == grpc.StatusCode.UNAVAILABLE


def test_client_certificates_name_the_caller_over_http(mtls_gateway, pki):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{mtls_gateway.http_port}", ssl=True, ssl_options={
        "ca_certs": str(pki.server_ca.pem), "certfile": str(pki.scoring.cert), "keyfile": str(pki.scoring.key)})
    tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert client.infer("double", [tensor]).as_numpy("OUTPUT0").tolist() == [[2, 2, 2, 2]]
    assert https_status(mtls_gateway, pki, pki.scoring, "/v2/models/classifier/infer") == 403
    assert https_status(mtls_gateway, pki, pki.nobody) == 403
    assert https_status(mtls_gateway, pki, pki.batch, "/v2/models/double") == 200
    assert https_status(mtls_gateway, pki, pki.batch, "/v2/models/classifier") == 403
    for refused in (None, pki.foreign, pki.expired):
        assert https_status(mtls_gateway, pki, refused) == "handshake"


def test_bearer_tokens_name_the_caller(mtls_gateway, pki):
    stub = grpc_stub(mtls_gateway, pki, pki.nobody)  # the certificate alone may do nothing
    assert grpc_code(stub, token=pki.token(team="risk")) == grpc.StatusCode.OK
    assert grpc_code(stub, token=pki.token("ec", team="risk")) == grpc.StatusCode.OK
    assert grpc_code(stub, token=pki.token(team="growth")) == grpc.StatusCode.PERMISSION_DENIED
    other_key = rsa.generate_private_key(65537, 2048)
    forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-a", "exp": int(time.time()) + 60, "team": "risk"},
                        other_key, algorithm="RS256", headers={"kid": "rsa-1"})
    for bad in (forged, pki.token(aud="someone-else", team="risk"), pki.token(exp=int(time.time()) - 3600, team="risk"),
                pki.token(iss="https://evil.test/", team="risk"), "not-a-token"):
        assert grpc_code(stub, token=bad) == grpc.StatusCode.UNAUTHENTICATED
    assert https_status(mtls_gateway, pki, pki.nobody, headers={"Authorization": f"Bearer {forged}"}) == 401
    assert https_status(mtls_gateway, pki, pki.nobody, headers={"Authorization": f"Bearer {pki.token(team='risk')}"}) == 200


def test_admin_api_needs_a_rule(mtls_gateway, pki):
    def admin(token: str | None, path: str = "/admin/routes") -> int:
        connection = http.client.HTTPConnection("127.0.0.1", mtls_gateway.admin_port, timeout=5)
        connection.request("POST" if path.endswith("reset") else "GET", path,
                           headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        response.read()
        return response.status

    ops = pki.token(sub="alice", groups=["ml-ops"])
    assert admin(None) == 401
    assert admin(pki.token(team="risk")) == 403
    assert admin(ops) == 200
    assert admin(None, "/admin/routes/double/reset") == 401
    assert admin(pki.token(team="risk"), "/admin/routes/double/reset") == 403
    assert admin(ops, "/admin/routes/double/reset") == 200
    probe = http.client.HTTPConnection("127.0.0.1", mtls_gateway.admin_port, timeout=5)
    probe.request("GET", "/ready")
    assert probe.getresponse().status == 200  # probes and /metrics stay open


def test_decisions_are_counted_per_principal_and_model(mtls_gateway, pki):
    grpc_code(grpc_stub(mtls_gateway, pki, pki.scoring))
    grpc_code(grpc_stub(mtls_gateway, pki, pki.nobody))
    assert metric(mtls_gateway, "infergate_access_decisions_total", principal=SCORING, model="double",
                  action="infer", decision="allow") >= 1
    assert metric(mtls_gateway, "infergate_access_decisions_total", principal="nobody.infergate.test", model="double",
                  action="infer", decision="deny") >= 1


def test_tls_without_rules_is_open_except_admin(triton, start_gateway, pki, tmp_path):
    """No `access` section: anyone may infer (over TLS, no client certificate asked), admin is closed."""
    gw = start_gateway(triton.grpc_url, routes=ROUTES, access=None, tls=tls_section(pki, tmp_path, client_auth="none"))
    assert grpc_code(grpc_stub(gw, pki, None)) == grpc.StatusCode.OK
    assert https_status(gw, pki, None) == 200
    connection = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=5)
    connection.request("GET", "/admin/routes")
    assert connection.getresponse().status == 401


def served_serial(gw, pki: Pki, trust: Path) -> int:
    context = ssl.create_default_context(cafile=trust)
    context.load_cert_chain(pki.scoring.cert, pki.scoring.key)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", gw.http_port), 5),
                             server_hostname="127.0.0.1") as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def test_certificate_rotation_under_load(triton, start_gateway, pki, tmp_path):
    """New server certificate (from a new CA) and a new client CA bundle swapped in while
    clients hammer both listeners: no request fails, new handshakes get the new certificate,
    and clients of a CA dropped from the bundle are refused afterwards."""
    gw = start_gateway(triton.grpc_url, routes=ROUTES, access=ACCESS, tls=tls_section(pki, tmp_path))
    server_ca2, clients_ca2 = CertAuthority(tmp_path, "server2"), CertAuthority(tmp_path, "clients2")
    both_servers = tmp_path / "both-servers.pem"
    both_servers.write_bytes(pki.server_ca.pem.read_bytes() + server_ca2.pem.read_bytes())
    new_server = server_ca2.issue("server2", dns=("localhost",), ips=("127.0.0.1",), server=True)
    scoring2 = clients_ca2.issue("scoring2", uris=(SCORING,))
    assert served_serial(gw, pki, both_servers) == pki.server.serial

    failures: list[str] = []
    done = threading.Event()
    counts = {"grpc": 0, "http": 0}

    def grpc_load() -> None:  # one long-lived connection: must survive the swap
        stub = grpc_stub(gw, pki, pki.scoring, trust=both_servers)
        while not done.is_set():
            code = grpc_code(stub)
            counts["grpc"] += 1
            if code != grpc.StatusCode.OK:
                failures.append(f"grpc {code}")

    def http_load() -> None:  # a new connection (and handshake) per request: sees both certificates
        while not done.is_set():
            status = https_status(gw, pki, pki.scoring, trust=both_servers)
            counts["http"] += 1
            if status != 200:
                failures.append(f"http {status}")

    threads = [threading.Thread(target=grpc_load), threading.Thread(target=http_load)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    live = tmp_path  # where tls_section copied the files the gateway reads
    (live / "clients.pem").write_bytes(pki.clients_ca.pem.read_bytes() + clients_ca2.pem.read_bytes())
    shutil.copy(new_server.key, live / "server.key.new")
    shutil.copy(new_server.cert, live / "server.pem.new")
    (live / "server.key.new").replace(live / "server.key")
    (live / "server.pem.new").replace(live / "server.pem")
    time.sleep(1.5)
    done.set()
    for t in threads:
        t.join(10)
    assert failures == [] and counts["grpc"] > 20 and counts["http"] > 20
    assert served_serial(gw, pki, both_servers) == new_server.serial
    assert grpc_code(grpc_stub(gw, pki, scoring2, trust=server_ca2.pem)) == grpc.StatusCode.OK
    # drop the old client CA: its certificates are refused on new connections
    (live / "clients.pem").write_bytes(clients_ca2.pem.read_bytes())
    time.sleep(1.0)
    assert grpc_code(grpc_stub(gw, pki, pki.scoring, trust=server_ca2.pem)) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(grpc_stub(gw, pki, scoring2, trust=server_ca2.pem)) == grpc.StatusCode.OK
    assert metric(gw, "infergate_tls_reloads_total", result="ok") >= 3


def test_tls_and_mutual_tls_to_triton(spawn_triton, start_gateway, pki, tmp_path):
    """Triton serving gRPC with mutual TLS: the gateway connects with its client certificate;
    without one, Triton refuses it and the gateway is not ready."""
    gateway_cert = pki.clients_ca.issue("gateway-client", dns=("infergate",))
    own = spawn_triton("--grpc-use-ssl=true", f"--grpc-server-cert={pki.server.cert}", f"--grpc-server-key={pki.server.key}",
                       f"--grpc-root-cert={pki.clients_ca.pem}", "--grpc-use-ssl-mutual=true")
    tls = {"ca": str(pki.server_ca.pem), "cert": str(gateway_cert.cert), "key": str(gateway_cert.key), "server_name": "localhost"}
    gw = start_gateway(own.grpc_url, routes=ROUTES, backend={"tls": tls})
    assert grpc_code(pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(gw.grpc_url))) == grpc.StatusCode.OK
    no_client_cert = start_gateway(own.grpc_url, routes=ROUTES, wait_ready=False,
                                   backend={"tls": {"ca": str(pki.server_ca.pem), "server_name": "localhost"}})
    code = grpc_code(pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(no_client_cert.grpc_url)))
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls, reason", [
    ({"cert": "missing.pem", "key": "missing.key"}, "tls.cert: No such file or directory"),
    ({"cert": "SERVER", "key": "OTHER_KEY"}, "tls.cert: [X509: KEY_VALUES_MISMATCH]"),
    ({"cert": "SERVER", "key": "SERVER_KEY", "client_auth": "require"}, "needs 'client_ca'"),
    ({"cert": "SERVER", "key": "SERVER_KEY", "client_ca": "CA", "client_auth": "optional"}, "not available on the gRPC listener"),
])
def test_bad_tls_config_is_rejected_with_file_and_line(pki, tmp_path, tls, reason):
    files = {"SERVER": pki.server.cert, "SERVER_KEY": pki.server.key, "OTHER_KEY": pki.scoring.key, "CA": pki.clients_ca.pem}
    tls = {k: str(files.get(v, v)) if isinstance(v, str) else v for k, v in tls.items()}
    (tmp_path / "routing.yaml").write_text("models:\n  double: {target: {backend: triton, model: double}}\n")
    (tmp_path / "gateway.yaml").write_text(json.dumps({"backends": {"triton": {"url": "127.0.0.1:1"}}, "tls": tls}))
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(tmp_path / "gateway.yaml")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"{tmp_path / 'gateway.yaml'}:1:" in result.stderr and reason in result.stderr
