"""Scraping a server's Prometheus metrics while the load runs, as Prometheus
would, so that the cost of ``--metrics`` shows in the server's CPU time.

Prometheus scrapes every 15 s by default; the harness scrapes once a second,
so that even a short window holds several scrapes and the figure errs on
the side of overstating their cost.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from types import TracebackType

__all__ = ["SCRAPE_INTERVAL", "Scraper"]

SCRAPE_INTERVAL = 1.0

# Bounds a scrape of a server that hangs; a healthy one answers in
# milliseconds.
_SCRAPE_TIMEOUT = 5.0

# A name every scrape of ours must contain.
_MUST_HAVE = "trio_upper_tcp_connections_total"

# Loopback, never through a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Scraper:
    """Scrape ``url`` at once and then every :data:`SCRAPE_INTERVAL` seconds
    in a thread, from ``with`` until its end.

    Attributes:
      scrapes: Scrapes answered with metrics that prometheus_client's
          parser reads.
      problems: What went wrong with the others, one line each.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(_SCRAPE_TIMEOUT * 2)

    def _run(self) -> None:
        while True:
            self._scrape_once()
            if self._stop.wait(SCRAPE_INTERVAL):
                return

    def _scrape_once(self) -> None:
        # Imported here: the metrics extra is needed only by the servers
        # that serve metrics (Server.needs says so).
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with _OPENER.open(self.url, timeout=_SCRAPE_TIMEOUT) as answer:
                text = answer.read().decode()
            names = {
                sample.name
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }
        except (OSError, ValueError) as exc:  # URLError is an OSError
            self.problems.append(f"scrape of {self.url} failed: {exc}")
            return
        if _MUST_HAVE not in names:
            self.problems.append(f"scrape of {self.url} had no {_MUST_HAVE}")
            return
        self.scrapes += 1
