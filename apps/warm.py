"""Warm a freshly started dashboard server before the first browser arrives:
`python apps/warm.py URL` waits for the server (`/_stcore/health`), then asks it for
`/_stcore/script-health-check` (served with `--server.scriptHealthCheckEnabled true`), which
runs the app once inside the server, as a session would, on its default page (the Overview).

That one run does, ahead of the user, what every first visit would otherwise wait for:
the imports (pandas, the store, the pages' helpers), the runs table, the headline pair and
the lab's story, all kept in the server's st.cache_data. `stabilitylab dashboard` starts it
beside the server; it exits when the run is done (or after two minutes) and never fails
the server. It reads nothing itself and writes nothing.
"""

import sys
import time
import urllib.request

WAIT_SECONDS = 120


def warm(url: str) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=5).read() == b"ok":
                break
        except OSError:
            time.sleep(0.2)
    try:
        return urllib.request.urlopen(f"{url}/_stcore/script-health-check", timeout=WAIT_SECONDS).status == 200
    except OSError:
        return False


if __name__ == "__main__":
    warm(sys.argv[1])
