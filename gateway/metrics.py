"""The gateway's Prometheus metrics: names, buckets, and labels from fixed sets only.

Every label value comes from a closed set (the voice catalogue, the formats and rates the
protocol knows, the documented error codes, the outcomes SessionMeter sets), and anything
else becomes ``other``, so no client can create a new series.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Final, Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import MetricWrapperBase

from gateway.dial import PRECONNECT_OUTCOMES
from rtts_plugin.protocol.codes import DESCRIPTIONS
from rtts_plugin.protocol.voices import ALL_FORMATS, ALL_RATES, VOICES

# Latency buckets for voice: 5 ms to 30 s.
LATENCY_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    30.0,
)
DURATION_BUCKETS: Final = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
RTF_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    5.0,
)

_KNOWN_CODES: Final = frozenset(DESCRIPTIONS) | {
    "APIG.0101",
    "APIG.0201",
    "APIG.0203",
    "APIG.0301",
    "APIG.0308",
    "APIG.0610",
}
_HTTP_CODES: Final = frozenset({400, 401, 403, 404, 408, 429, 500, 502, 503, 504})
# The gateway's own codes: how a session failed when no Huawei code or HTTP status says it.
_GATEWAY_CODES: Final = frozenset(
    {"network", "timeout", "protocol", "too_big", "policy", "draining", "circuit_open", "busy"}
)


def voice_label(voice: object) -> str:
    """The voice if it is in the catalogue, ``none`` if absent, else ``other``."""
    if voice is None:
        return "none"
    return voice if isinstance(voice, str) and voice in VOICES else "other"


def format_label(audio_format: object) -> str:
    """The audio format if the protocol knows it, else ``other``."""
    return (
        audio_format if isinstance(audio_format, str) and audio_format in ALL_FORMATS else "other"
    )


def rate_label(sample_rate: object) -> str:
    """The sample rate if the protocol knows it (``8000``/``16000``), else ``other``."""
    rate = str(sample_rate) if isinstance(sample_rate, int | str) else ""
    return rate if rate in ALL_RATES else "other"


def code_label(code: str | int | None) -> str:
    """A documented Huawei code, ``http_<status>``, ``network``, ``timeout``, ``""``, ``other``."""
    if code is None or code == "":
        return ""
    if isinstance(code, int):
        return (
            f"http_{code}" if code in _HTTP_CODES else ("http_5xx" if code >= 500 else "http_other")
        )
    if code in _KNOWN_CODES or code in _GATEWAY_CODES:
        return code
    return "other"


class _KnownChildren(MetricWrapperBase):
    """``labels()`` answered from a dict once a label tuple was seen (every session asks).

    prometheus_client validates, converts and locks on every call; label values here come
    from closed sets, so the dict stays as small as the metric's series.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._children: dict[tuple[object, ...], Self] = {}

    def labels(self, *labelvalues: object, **labelkwargs: object) -> Self:
        """The child for these label values (positional values are remembered)."""
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)
        try:
            return self._children[labelvalues]
        except KeyError:
            child = self._children[labelvalues] = super().labels(*labelvalues)
            return child

    def remove(self, *labelvalues: Any) -> None:
        """Remove a series (and forget every remembered child, which may be it)."""
        self._children.clear()
        super().remove(*labelvalues)

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        """Remove matching series (and forget every remembered child)."""
        self._children.clear()
        super().remove_by_labels(labels)

    def clear(self) -> None:
        """Remove every series (and forget every remembered child)."""
        self._children.clear()
        super().clear()


class _Counter(_KnownChildren, Counter):
    pass


class _Gauge(_KnownChildren, Gauge):
    pass


class _Histogram(_KnownChildren, Histogram):
    pass


class GatewayMetrics:
    """All metrics of one gateway, in their own registry (so several can run in a process)."""

    def __init__(self, backend: str, max_sessions: int, relay: str = "python") -> None:
        self.registry = CollectorRegistry()
        self.backend = backend
        registry = self.registry
        self.sessions = _Counter(
            "rtts_sessions",
            "Sessions by outcome, voice, sample rate and audio format.",
            ["backend", "outcome", "voice", "sample_rate", "audio_format"],
            registry=registry,
        )
        self.errors = _Counter(
            "rtts_errors",
            "Failed sessions by outcome and code (Huawei code, http_<status>, network, timeout).",
            ["backend", "outcome", "code"],
            registry=registry,
        )
        self.upstream_connect = _Histogram(
            "rtts_upstream_connect_seconds",
            "Time to open the upstream WebSocket (handshake included).",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_start, self.time_to_first_audio, self.time_to_end = (
            _Histogram(
                f"rtts_time_to_{moment}_seconds",
                f"Time from the client's START to {what}.",
                ["backend", "voice"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            )
            for moment, what in (
                ("start", "the server's START"),
                ("first_audio", "the first audio byte"),
                ("end", "END"),
            )
        )
        self.session_duration = _Histogram(
            "rtts_session_duration_seconds",
            "Time from the client's connection to its close.",
            ["backend", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.real_time_factor = _Histogram(
            "rtts_real_time_factor",
            "Synthesis time (START to END) divided by the audio's duration; below 1 is faster "
            "than real time.",
            ["backend", "voice"],
            buckets=RTF_BUCKETS,
            registry=registry,
        )
        self.audio_bytes = _Counter(
            "rtts_audio_bytes",
            "Audio bytes relayed to clients.",
            ["backend", "audio_format", "sample_rate"],
            registry=registry,
        )
        self.audio_seconds = _Counter(
            "rtts_audio_seconds",
            "Seconds of audio relayed (PCM and G.711; MP3 is not counted).",
            ["backend", "voice"],
            registry=registry,
        )
        self.text_characters = _Counter(
            "rtts_text_characters",
            "Characters of text sent for synthesis (what billing counts).",
            ["backend", "voice"],
            registry=registry,
        )
        self.active_sessions = _Gauge(
            "rtts_active_sessions", "Sessions in progress.", ["backend"], registry=registry
        )
        self.upstream_spares = _Gauge(
            "rtts_upstream_spares",
            "Upstream connections open and waiting for a session (--upstream-spares).",
            ["backend"],
            registry=registry,
        )
        self.sessions_on_spare = _Counter(
            "rtts_sessions_on_spare",
            "Sessions that started on a spare upstream connection, with no upstream handshake.",
            ["backend"],
            registry=registry,
        )
        self.upstream_preconnects = _Counter(
            "rtts_upstream_preconnects",
            "TCP connects to the upstream started when a caller connected, by what became of "
            "them: used by the caller's session, replaced by a fresh connect (stale, closed by "
            "the upstream, still connecting), or unused (the caller refused, gone or not dialed).",
            ["backend", "outcome"],
            registry=registry,
        )
        self.sessions_limit = _Gauge(
            "rtts_sessions_limit", "Concurrent sessions allowed.", ["backend"], registry=registry
        )
        self.ready = _Gauge(
            "rtts_gateway_ready",
            "1 when this gateway can take sessions (as /readyz): listening, engine loaded, "
            "not draining; the upstream's reachability does not count.",
            ["backend"],
            registry=registry,
        )
        self.upstream_reachable = _Gauge(
            "rtts_upstream_reachable",
            "1 when the last TCP probe (every 5 s) of the upstream (Huawei Cloud, "
            "--upstream-url, or the local engine) connected.",
            ["backend"],
            registry=registry,
        )
        # Circuit breaking and failover (gateway.breaker, gateway.upstreams); the upstream
        # label is one of primary, secondary, local.
        self.breaker_state = _Gauge(
            "rtts_upstream_breaker_state",
            "Circuit breaker of each upstream: 0 closed, 1 half-open, 2 open.",
            ["backend", "upstream"],
            registry=registry,
        )
        self.breaker_transitions = _Counter(
            "rtts_upstream_breaker_transitions",
            "Circuit breaker transitions, by the state entered.",
            ["backend", "upstream", "state"],
            registry=registry,
        )
        self.breaker_probes = _Counter(
            "rtts_upstream_breaker_probes",
            "Handshake-only probes of upstreams whose breaker is open, by result (ok, failed).",
            ["backend", "upstream", "result"],
            registry=registry,
        )
        self.upstream_sessions = _Counter(
            "rtts_upstream_sessions",
            "Sessions relayed through each upstream (secondary and local: failovers).",
            ["backend", "upstream"],
            registry=registry,
        )
        self.refused_fast = _Counter(
            "rtts_sessions_refused_fast",
            "Sessions answered 503 at once because every upstream's breaker was open.",
            ["backend"],
            registry=registry,
        )
        self.build = Info(
            "rtts_gateway_build", "Version and runtime of the gateway.", registry=registry
        )
        self.sessions_limit.labels(backend).set(max_sessions)
        self.active_sessions.labels(backend).set(0)
        self.upstream_spares.labels(backend).set(0)
        self.sessions_on_spare.labels(backend)
        for outcome in PRECONNECT_OUTCOMES:
            self.upstream_preconnects.labels(backend, outcome)
        self.build.info(
            {
                "version": package_version() or "unknown",
                "python": platform.python_version(),
                "backend": backend,
                "relay": relay,
            }
        )


def package_version() -> str | None:
    """The installed project's version; ``None`` when run from a source tree never installed."""
    try:
        return metadata.version("huawei-rtts-pipecat")
    except metadata.PackageNotFoundError:
        return None
