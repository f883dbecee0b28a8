"""Runs inside a test pod (python3 of the worker image, standard library only) and prints
one JSON line of what the pod could see and do; the test reads it back with `kubectl logs`.

    python3 - < probe.py   (the test passes the source with `-c`)
"""

import json
import os
import socket
import ssl
import urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"
report: dict[str, object] = {"uid": os.getuid(), "gid": os.getgid()}

try:
    with open("/probe-write-test", "w"):
        pass
    report["root_filesystem_writable"] = True
except OSError:
    report["root_filesystem_writable"] = False

host = os.environ["KUBERNETES_SERVICE_HOST"]
port = os.environ["KUBERNETES_SERVICE_PORT"]
report["kubernetes_service_host"] = host
with open(f"{SA}/token") as f:
    token = f.read().strip()
review = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
request = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=review.encode(),
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    method="POST",
)
context = ssl.create_default_context(cafile=f"{SA}/ca.crt")
# The serving certificate names the Service's DNS names and ClusterIP, so it checks out.
with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310 (https built above)
    report["username"] = json.load(response)["status"]["userInfo"]["username"]

for name in os.environ.get("PROBE_RESOLVE", "").split():
    try:
        report[f"resolve:{name}"] = socket.gethostbyname(name)
    except OSError as error:
        report[f"resolve:{name}"] = f"error: {error}"

print(json.dumps(report), flush=True)
