"""The image's HEALTHCHECK: GET /readyz on this container's hooklab-server, with Python's urllib
(the image has no curl).

Exit 0 on 200; 1 otherwise (503 while the server is not ready, a refused connection while it
starts), with the reason on stderr, which Docker keeps in the container's health log. The Host
header is one the server accepts: its first HOOKLAB_ALLOWED_HOSTS name, or 127.0.0.1 when any
host is allowed or none is set (the loopback names are then accepted).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

PATH = "/readyz"
TIMEOUT_S = 4.0  # under the HEALTHCHECK's --timeout


def readiness_request() -> urllib.request.Request:
    port = os.environ.get("HOOKLAB_PORT", "8000").strip() or "8000"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}")
    hosts = [h.strip() for h in os.environ.get("HOOKLAB_ALLOWED_HOSTS", "").split(",")]
    hosts = [h for h in hosts if h]
    if hosts and "*" not in hosts:
        request.add_header("Host", hosts[0])
    return request


def main() -> int:
    try:
        with urllib.request.urlopen(readiness_request(), timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        print(f"{PATH}: {exc.code} {exc.read(500).decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:  # refused, reset, timed out
        print(f"{PATH}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
