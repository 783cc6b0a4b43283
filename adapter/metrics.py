"""What the adapter counts for Prometheus (prometheus_client; served at GET /metrics, or on its own
port: METRICS_ENABLED, METRICS_PORT in config.py).

    adapter_requests_total{route, status}            answers sent; 499: none, the client went away before its
                                                     answer began (mid-upload, or while the model worked)
    adapter_request_duration_seconds{route}          end to end, first byte in -> last byte out
    adapter_model_server_duration_seconds{call}      one call to the model server's inference API: MODEL_SERVER_CALLS
                                                     (a retry is a second one; status checks are not timed)
    adapter_requests_in_flight, adapter_bytes_in_flight   what the in-flight caps hold now (adapter/limits.py's
                                                     InFlight: requests with a body, the bytes charged to them,
                                                     those still held by the model server after a 504 included)
    adapter_explanations_at_model_server, adapter_explanations_waiting   explanations there now, and
                                                     those waiting their turn (adapter/limits.py)
    adapter_connections_open, adapter_clients_connected   client connections open now, and the clients
                                                     (addresses; an IPv6 /64) holding them: what
                                                     MAX_OPEN_CONNECTIONS, MAX_CLIENT_CONNECTIONS count
    adapter_refusals_total{reason}                   the adapter's own (a model server's passed on: not here):
                                                     timeout (408), too_large (413), url_too_long (414),
                                                     pipelined (429), headers_too_large (431), bad_http (400 at the parser),
                                                     unsupported (501: WebSocket, CONNECT, upgrades, a
                                                     Transfer-Encoding other than chunked), encoded (415: a
                                                     Content-Encoding), length_required (411: HTTP/1.0 body
                                                     without Content-Length),
                                                     busy (a 503 + Retry-After: in-flight caps and shares,
                                                     explanations' turns, the shrink wait, no pooled connection
                                                     to the model server in time), gave_way (503 + Retry-After
                                                     mid-body or before it was sent to the model server: its
                                                     client held past its fair share of the in-flight caps
                                                     while another's request waited)
    adapter_busy_refusals_total{cap}                 the busy refusals by what refused them: BUSY_CAPS below
    adapter_model_server_retries_total               predictions sent again after their worker died or their
                                                     connection dropped mid-answer
    adapter_model_server_errors_total{kind}          failed predictions: MODEL_SERVER_ERROR_KINDS below

Each app has its own registry (tests build several apps in one process). Routes are a fixed set
(ROUTES, else "other"), so the series stay few whatever paths clients try.

GET /metrics on the users' port (render()) reuses its last page while nothing was recorded since and it is
younger than RENDER_REUSE_S: a render costs ~3 ms of the event loop, and 6 connections scraping nonstop took a
lone /classify/'s median from 19 to 65 ms on 2 cores. An answer recorded, or a watched gauge (in flight,
explanations) that moved, renders anew, so counts and gauges read after a change are exact; the scrapes' own
count and latency lag by at most RENDER_REUSE_S.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SCRAPE_ROUTE = "/metrics"  # a scrape's own begin and answer change nothing a reused page must show
ROUTES = frozenset({"/classify/", "/classify", "/explain/", "/explain", "/classes", "/settings", "/health", SCRAPE_ROUTE,
                    "/"})
# Refusals the adapter makes itself, by status; 503 counts only with Retry-After (caps, turns, waits, a full pool:
# a 503 for a model server that is down or not ready is the model server's, not a refusal). A 400 is
# one only at the HTTP parser (refused_before_app: bad_http); the app's 400s (no image, a picture the
# handler refuses) are answers about a request's content, counted in adapter_requests_total alone.
REFUSAL_REASONS = {408: "timeout", 411: "length_required", 413: "too_large", 414: "url_too_long", 415: "encoded",
                   429: "pipelined", 431: "headers_too_large", 501: "unsupported"}
PARSER_REFUSAL = "bad_http"  # the parser's 400, and any status the parser refuses with that has no reason above
BUSY_REFUSAL = "busy"  # a 503 with Retry-After (its caps, shares, turns and waits; the pool to the model server)
# A 503 with Retry-After to an upload stopped mid-body for another client's (adapter/limits.py InFlight.to_give_way):
# apart from busy, as no cap refused it (another client's request took its place); noted as its busy_cap.
GAVE_WAY = "gave_way"
# Connections reset before a byte was read (adapter/protocol.py OpenConnections), by the cap that refused them.
CONNECTION_REFUSALS = {"max_open_connections": "connections", "max_client_connections": "client_connections"}
# The HTTP edge's own reasons (adapter/protocol.py: requests refused at the parser, connections reset), which KServe's
# model server counts too under the same names (handler/kserve_predictor.py HttpRefused).
EDGE_REFUSALS = (*REFUSAL_REASONS.values(), PARSER_REFUSAL, *CONNECTION_REFUSALS.values())
# adapter_model_server_errors_total's kinds (adapter/model_server.py's count_failure picks one; README lists them).
MODEL_SERVER_ERROR_KINDS = {
    "unreachable": "nobody answers at its address (refused, reset, connect timeout)",
    "timeout": "no answer within TS_PREDICT_TIMEOUT_S (504)",
    "busy": "every pooled connection to it stayed in use (the adapter's 503 busy)",
    "unavailable": "its own 503: its queue full, or no worker up",
    "no_model": "its 404: the model is not registered there (or was unloaded)",
    "error_answer": "a 5xx of its own (502)",
    "bad_answer": "a 200 that is not a usable answer (502)",
    "key_refused": "TorchServe refused the adapter's key, a renewed one too (503)",
}
# adapter_busy_refusals_total's caps (each busy 503 names one: adapter/request_context.py note_busy; README lists them).
BUSY_CAPS = {
    "in_flight": "MAX_REQUESTS_IN_FLIGHT / MAX_BYTES_IN_FLIGHT: everyone's requests and bytes held",
    "client_in_flight": "MAX_CLIENT_REQUESTS_IN_FLIGHT / MAX_CLIENT_BYTES_IN_FLIGHT: one client's share of them",
    "client_explanations": "MAX_CLIENT_EXPLANATIONS_IN_FLIGHT: one client's explanations",
    "explanation_wait": "EXPLANATION_WAIT_S: no turn at the model server for an explanation in time",
    "shrink_wait": "SHRINK_WAIT_S: no shrinking thread in time",
    "model_server_connections": "TS_MAX_CONNECTIONS: no pooled connection to the model server in time",
}
# adapter_model_server_duration_seconds' calls: apart, as an explanation takes 10-50 times a prediction's time.
MODEL_SERVER_CALLS = {
    "prediction": "a client's /classify/",
    "explanation": "a client's /explain/",
    "probe": "/health's own prediction of a 1-pixel image, when none succeeded for HEALTH_MAX_SILENCE_S",
}
# Seconds: a CPU prediction takes milliseconds, a queue under load tenths, the deadline is 10 s.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RENDER_REUSE_S = 1.0  # the oldest page render() gives again (Prometheus scrapes every 15 s or more)


def parser_refusal_reason(status: int) -> str:
    """The reason a request refused at the HTTP parser with ``status`` is counted under."""
    return REFUSAL_REASONS.get(status, PARSER_REFUSAL)


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("adapter_requests", "Answers sent, by route and HTTP status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("adapter_request_duration_seconds", "A request end to end, in the adapter",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_server_latency = Histogram("adapter_model_server_duration_seconds",
                                              "One call to the model server's inference API, by call",
                                              ["call"], buckets=LATENCY_BUCKETS, registry=r)
        self.refusals = Counter("adapter_refusals", "Requests the adapter refused itself, by reason", ["reason"],
                                registry=r)
        self.busy = Counter("adapter_busy_refusals", "Busy refusals (503 + Retry-After), by the cap that refused",
                            ["cap"], registry=r)
        self.retries = Counter("adapter_model_server_retries", "Predictions sent again after their worker died",
                               registry=r)
        self.model_server_errors = Counter("adapter_model_server_errors", "Failed calls to the model server, by kind",
                                           ["kind"], registry=r)
        # Every reason and kind from the start, at 0: rate() and increase() see the first one (a series that
        # appears at 1 is no increase to Prometheus), and a dashboard lists them all.
        for reason in (*EDGE_REFUSALS, BUSY_REFUSAL, GAVE_WAY):
            self.refusals.labels(reason)
        for kind in MODEL_SERVER_ERROR_KINDS:
            self.model_server_errors.labels(kind)
        for call in MODEL_SERVER_CALLS:
            self.model_server_latency.labels(call)
        for cap in BUSY_CAPS:
            self.busy.labels(cap)
        # (route, status) -> child, route -> child: labels() costs more than the increment itself
        self._requests, self._latency = {}, {}
        # Bumped by each answer (a scrape's own excepted) and each parser refusal. The other records (retries,
        # model-server errors and latency) happen while a request is in flight and are followed by its answer.
        # render()'s last page: ((recorded, the watched gauges' values), time.monotonic(), text).
        self.recorded = 0
        self._gauged: list = []  # the watched gauges' readers: a page with other values is rendered anew
        self._page: tuple[tuple, float, bytes] | None = None

    def watch_in_flight(self, in_flight) -> None:
        """Gauges of adapter/limits.py's InFlight, read when Prometheus scrapes: the counts its caps decide on."""
        self._gauged.append(lambda: (in_flight.requests, in_flight.bytes))
        Gauge("adapter_requests_in_flight", "Requests with a body held now (MAX_REQUESTS_IN_FLIGHT's count)",
              registry=self.registry).set_function(lambda: in_flight.requests)
        Gauge("adapter_bytes_in_flight", "Body bytes charged to them now (MAX_BYTES_IN_FLIGHT's count)",
              registry=self.registry).set_function(lambda: in_flight.bytes)

    def watch_connections(self, connections) -> None:
        """Gauges of adapter/protocol.py's OpenConnections, read when Prometheus scrapes."""
        self._gauged.append(lambda: (connections.total, len(connections.per_client)))
        Gauge("adapter_connections_open", "Client connections open now (MAX_OPEN_CONNECTIONS' count)",
              registry=self.registry).set_function(lambda: connections.total)
        Gauge("adapter_clients_connected", "Clients with a connection open now (MAX_CLIENT_CONNECTIONS counts "
              "each one's; trusted proxies not among them)", registry=self.registry).set_function(
            lambda: len(connections.per_client))

    def watch_explanations(self, explanations) -> None:
        """Gauges of adapter/limits.py's Explanations, read when Prometheus scrapes."""
        self._gauged.append(lambda: (explanations.at_server, explanations.waiting))
        Gauge("adapter_explanations_at_model_server", "Explanations being answered by the model server now",
              registry=self.registry).set_function(lambda: explanations.at_server)
        Gauge("adapter_explanations_waiting", "Explanations waiting for their turn at the model server",
              registry=self.registry).set_function(lambda: explanations.waiting)

    def answered(self, route: str, status: int, seconds: float, busy: bool, parser_refused: bool = False,
                 relayed: bool = False, busy_cap: str | None = None) -> None:
        """One answer of the app's; ``parser_refused``: the HTTP parser answered it instead (its body broke);
        ``relayed``: it passes on the model server's own refusal (no refusal of the adapter's); ``busy_cap``: what
        refused it busy (BUSY_CAPS), or GAVE_WAY."""
        if route != SCRAPE_ROUTE:
            self.recorded += 1
        key = (route, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(route, str(status))
        child.inc()
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = self.latency.labels(route)
        latency.observe(seconds)
        if parser_refused:
            reason = REFUSAL_REASONS.get(status, PARSER_REFUSAL)
        elif relayed:
            reason = None
        else:
            reason = ((GAVE_WAY if busy_cap == GAVE_WAY else BUSY_REFUSAL) if status == 503 and busy
                      else REFUSAL_REASONS.get(status))
        if reason is not None:
            self.refusals.labels(reason).inc()
        if reason == BUSY_REFUSAL and busy_cap in BUSY_CAPS:
            self.busy.labels(busy_cap).inc()

    def refused_before_app(self, status: int) -> None:
        """A refusal at the HTTP parser (adapter/protocol.py): no route, no app."""
        self.recorded += 1
        self.requests.labels("other", str(status)).inc()
        self.refusals.labels(parser_refusal_reason(status)).inc()

    def connection_reset(self, cap: str) -> None:
        """A connection reset before it was read, by ``cap`` (max_open_connections, max_client_connections)."""
        self.recorded += 1
        self.refusals.labels(CONNECTION_REFUSALS[cap]).inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text format: the last page again while nothing was recorded since it was
        rendered and it is younger than RENDER_REUSE_S."""
        # (read before rendering: a record meanwhile renders anew)
        recorded, now = (self.recorded, *(gauged() for gauged in self._gauged)), time.monotonic()
        page = self._page
        if page is not None and page[0] == recorded and now - page[1] < RENDER_REUSE_S:
            return page[2]
        text = generate_latest(self.registry)
        self._page = (recorded, now, text)
        return text


def start_metrics_server(registry: CollectorRegistry, host: str, port: int, max_connections: int,
                         timeout_s: float):
    """GET /metrics on its own port (METRICS_PORT), served from threads: at most ``max_connections`` at once (more
    are closed at once), each closed ``timeout_s`` after it was accepted (a client dripping a byte at a time
    included: review 30's second look). prometheus_client's own server held a
    thread and a file descriptor per connection for ever: 788 half-sent requests on it took the adapter's last
    descriptors and /classify/ stopped answering (review 30). Returns the server (``shutdown``, ``server_close``)."""
    import socket
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    def _hang_up(connection) -> None:  # its handler's read or write then ends
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    class Handler(WSGIRequestHandler):
        timeout = timeout_s  # socketserver sets it on the connection: a stalled client is dropped

        def log_message(self, format, *args):  # no line per scrape
            pass

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        slots = threading.BoundedSemaphore(max_connections)

        def process_request(self, request, client_address):
            if not self.slots.acquire(blocking=False):  # over the cap: closed at once, nothing held
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request, client_address):
            deadline = threading.Timer(timeout_s, _hang_up, (request,))
            deadline.daemon = True
            deadline.start()
            try:
                super().process_request_thread(request, client_address)
            finally:
                deadline.cancel()
                self.slots.release()

        def handle_error(self, request, client_address):  # a timed-out or reset client: not worth a traceback
            pass

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
