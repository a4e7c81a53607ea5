"""``HuaweiRTTSService``: Huawei Cloud real-time TTS as a pipecat TTS service.

Each text handed to :meth:`HuaweiRTTSService.run_tts` becomes one rtts connection (more if
it is over the voice's character limit): handshake, one START, binary audio streamed out as
``TTSAudioRawFrame`` as it arrives, optional RESULT word timings, END, close. It talks to
Huawei Cloud directly (token, IAM password or AK/SK) or to the ``rtts-gateway`` sidecar.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transcriptions.language import Language, resolve_language
from pipecat.utils.errors import ErrorCategory, classify_http_status_code
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from rtts_plugin.audio import WireAudioDecoder
from rtts_plugin.budget import UtteranceBudget, Wait
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.errors import (
    AuthenticationError,
    HandshakeError,
    InvalidRequestError,
    InvalidSettingsError,
    RttsError,
    RttsTimeoutError,
    SynthesisError,
)
from rtts_plugin.health import FailureRun, ProbeBackoff, probe_until_answered
from rtts_plugin.heard import HeardLedger, Utterance, UtteranceMark, spoken_chars
from rtts_plugin.notices import warn_once
from rtts_plugin.protocol import codes
from rtts_plugin.protocol.messages import StartRequest, SynthesisConfig, WordTiming
from rtts_plugin.protocol.session import AudioReceived, Started, WordsReceived
from rtts_plugin.protocol.text import split_text
from rtts_plugin.protocol.validation import check_voice_name, validate_config
from rtts_plugin.protocol.voices import (
    DEFAULT_PROPERTY,
    Voice,
    suggest_voices,
    voice_capabilities,
)
from rtts_plugin.transport import (
    is_transient,
    open_authenticated,
    release,
    retry_delay,
    stream_synthesis,
)

_LANGUAGES: dict[Language, str] = {
    Language.ZH: "zh-CN",
    Language.ZH_CN: "zh-CN",
    Language.EN: "en-US",
    Language.EN_US: "en-US",
    Language.AR: "ar",
}
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")
_AUTH_CODES = frozenset(
    {codes.TOKEN_INVALID, codes.AUTH_MISSING, "SIS.0003", "SIS.0103", "APIG.0301"}
)
_RATE_LIMIT_CODES = frozenset({codes.CONCURRENCY_LIMIT, "APIG.0308"})
# The request itself is wrong (voice, rate, format, a parameter, the JSON): the same request
# fails the same way every time, so pipecat's permanent INVALID_REQUEST.
_REQUEST_CODES = frozenset(
    {
        codes.INVALID_SAMPLE_RATE,
        codes.INVALID_AUDIO_FORMAT,
        codes.INVALID_PROPERTY,
        codes.INVALID_PARAMETER,
        codes.MISSING_FIELD,
        codes.UNSUPPORTED_PARAMETER,
        codes.MALFORMED_REQUEST,
    }
)


@dataclass
class HuaweiRTTSSettings(TTSSettings):
    """Runtime-updatable settings (store and delta mode, as pipecat's ``TTSSettings``).

    Parameters:
        voice: The rtts voice (``config.property``), e.g. ``chinese_huaxiaomei_common``.
        language: Derived from the voice unless given.
        speed: −500…500 (0 is normal).
        pitch: −500…500 (0 is normal).
        volume: 0…100 (50 is normal).
    """

    speed: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    pitch: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    volume: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)

    _aliases: ClassVar[dict[str, str]] = {"voice_id": "voice", "property": "voice"}


def error_category(error: RttsError) -> ErrorCategory:
    """The pipecat category of an rtts failure.

    Permanent (the service is written off until its settings change): bad credentials
    (``AUTHENTICATION``), 403 (``AUTHORIZATION``) and a request the cloud refuses
    (``INVALID_REQUEST``: SIS.0402/0410/0411/0415/0012/0031/0032, HTTP 400/404). Transient:
    429 and SIS.0312 (``RATE_LIMIT``), no connection, timeouts and a close before END
    (``CONNECTIVITY``), the rest (``SERVER``).
    """
    if isinstance(error, AuthenticationError):
        return ErrorCategory.AUTHENTICATION
    if isinstance(error, InvalidRequestError):
        return ErrorCategory.INVALID_REQUEST
    if isinstance(error, HandshakeError):
        if error.error_code in _AUTH_CODES:
            return ErrorCategory.AUTHENTICATION
        if error.error_code in _RATE_LIMIT_CODES:
            return ErrorCategory.RATE_LIMIT
        if error.error_code in _REQUEST_CODES:
            return ErrorCategory.INVALID_REQUEST
        if error.status == 0:
            return ErrorCategory.CONNECTIVITY
        category = classify_http_status_code(error.status)
        return ErrorCategory.SERVER if category is ErrorCategory.UNKNOWN else category
    if isinstance(error, SynthesisError):
        if error.error_code in _AUTH_CODES:
            return ErrorCategory.AUTHENTICATION
        if error.error_code in _RATE_LIMIT_CODES:
            return ErrorCategory.RATE_LIMIT
        if error.error_code in _REQUEST_CODES:
            return ErrorCategory.INVALID_REQUEST
        return ErrorCategory.CONNECTIVITY if error.kind == "closed" else ErrorCategory.SERVER
    if isinstance(error, RttsTimeoutError):
        return ErrorCategory.CONNECTIVITY
    return ErrorCategory.SERVER


def _validated(settings: HuaweiRTTSSettings) -> tuple[SynthesisConfig, Voice]:
    """Check a complete settings object with the protocol's own rules.

    The catalogue is open: a voice it does not list is passed to the cloud with conservative
    capabilities (one warning per voice); the cloud's answer (SIS.0411) is final.
    """
    if settings.extra:
        raise InvalidRequestError(
            codes.INVALID_PARAMETER,
            f"unknown setting(s) {', '.join(sorted(settings.extra))}; "
            "HuaweiRTTSService takes voice, language, speed, pitch and volume",
        )
    config = validate_config(
        {
            "property": settings.voice,
            "speed": settings.speed,
            "pitch": settings.pitch,
            "volume": settings.volume,
        }
    )
    check_voice_name(config.voice)
    voice, known = voice_capabilities(config.voice)
    if not known:  # once per voice and process, not per utterance
        hint = suggest_voices(config.voice)
        warn_once(
            "HuaweiRTTSService",
            f"voice {config.voice!r} is not in the plugin's catalogue; passing it to the cloud "
            f"with conservative capabilities ({voice.text_limit} characters per connection, "
            "pcm, 8000/16000 Hz, no word timestamps)"
            + (f"; did you mean {', '.join(hint)}?" if hint else ""),
        )
    return config, voice


@dataclass
class _Spare:
    connection: ClientConnection
    opened: float


class HuaweiRTTSService(TTSService):
    """Huawei Cloud real-time TTS (rtts) for pipecat: one connection per utterance.

    Each utterance has one time budget (:mod:`rtts_plugin.budget`); while it runs, pipecat's
    audio context is kept open, so a slow server never splits an utterance. A run of
    ``max_consecutive_failures`` transient failures makes the service unusable (a
    ``ServiceSwitcher`` fails over); a handshake-only probe then brings it back and raises
    ``on_recovered(service, outage_seconds)``.

    Connect straight to Huawei Cloud::

        tts = HuaweiRTTSService(region="cn-north-4", project_id="…", token="…",
                                settings=HuaweiRTTSService.Settings(voice="chinese_huaxiaomei_common"))

    or through the sidecar gateway, which holds the credentials::

        tts = HuaweiRTTSService(url="ws://127.0.0.1:8765/v1/my-project/rtts")

    Anything not given is read from ``HUAWEI_RTTS_*`` environment variables
    (:class:`~rtts_plugin.config.HuaweiRTTSConnection`).
    """

    Settings = HuaweiRTTSSettings
    _settings: HuaweiRTTSSettings

    def __init__(
        self,
        *,
        url: str | None = None,
        region: str | None = None,
        project_id: str | None = None,
        token: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        iam_username: str | None = None,
        iam_password: str | None = None,
        iam_domain: str | None = None,
        connection: HuaweiRTTSConnection | None = None,
        settings: HuaweiRTTSSettings | None = None,
        word_timestamps: bool = False,
        sample_rate: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            url: Full rtts URL, e.g. the gateway's ``ws://127.0.0.1:8765/v1/{project_id}/rtts``.
            region: Huawei Cloud region (with ``project_id``) when connecting directly.
            project_id: The project of that region.
            token: A ready IAM token.
            access_key: AK for AK/SK signing (with ``secret_key``).
            secret_key: SK for AK/SK signing.
            iam_username: IAM user whose password is exchanged for tokens.
            iam_password: That user's password.
            iam_domain: That user's account (domain) name.
            connection: Every connection setting at once (timeouts, retries, prewarm…);
                the arguments above override its fields.
            settings: Voice, language, speed, pitch and volume.
            word_timestamps: Ask for word timings (``subtitle``) on voices that have them,
                so the LLM context holds exactly what was spoken, also when interrupted or
                when synthesis fails mid-audio.
            sample_rate: Output rate; default the pipeline's.
            **kwargs: Passed to pipecat's ``TTSService``.

        Raises:
            InvalidSettingsError: a setting is invalid; the message says which and why.
        """
        self._connection = _resolve_connection(
            connection,
            url=url,
            region=region,
            project_id=project_id,
            token=token,
            access_key=access_key,
            secret_key=secret_key,
            iam_username=iam_username,
            iam_password=iam_password,
            iam_domain=iam_domain,
        )
        store = self.Settings(
            model=None, voice=DEFAULT_PROPERTY, language=None, speed=0, pitch=0, volume=50
        )
        if settings is not None:
            store.apply_update(settings)
        try:
            _, voice = _validated(store)
        except InvalidRequestError as exc:
            raise InvalidSettingsError(exc.message) from None
        if store.language is None:
            store.language = voice.language
        super().__init__(
            push_text_frames=not word_timestamps,
            push_stop_frames=True,
            push_start_frame=True,
            sample_rate=sample_rate,
            settings=store,
            **kwargs,
        )
        self._url = self._connection.resolved_url
        self._auth = self._connection.build_auth()
        self._word_timestamps = word_timestamps
        # Word times restart at 0 on every connection, and pipecat times a word from the
        # first audio of its context's playback: each piece's words are offset by the audio
        # already pushed into that playback (a reply takes several run_tts calls, a context
        # may be interleaved with another's, and pipecat replays a context that went quiet
        # as a new playback). Seconds of audio per context, for as long as it plays.
        self._playback_seconds: dict[str, float] = {}
        # What the caller heard decides what reaches the LLM context (rtts_plugin.heard).
        self._heard = HeardLedger(streaming=self._is_streaming_tokens)
        self._utterance = Utterance("")
        self._spare: _Spare | None = None
        self._spare_taken = asyncio.Event()
        self._spare_task: asyncio.Task[None] | None = None
        self.prewarm_hits = 0
        self._failures = FailureRun(
            self._connection.max_consecutive_failures,
            ProbeBackoff(self._connection.probe_interval, self._connection.probe_max_interval),
        )
        self._probe_task: asyncio.Task[None] | None = None
        # Contexts whose silence is accounted for: reported (and counted) as an error, or
        # nothing in them was speakable.
        self._reported_silent: deque[str] = deque(maxlen=64)
        self._register_event_handler("on_recovered")

    def can_generate_metrics(self) -> bool:
        """TTFB, processing and character-usage metrics are reported."""
        return True

    def language_to_service_language(self, language: Language) -> str | None:
        """The catalogue's language tag (``zh-CN``, ``en-US``, ``ar``) for a pipecat language."""
        return resolve_language(language, _LANGUAGES, use_base_code=False)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        """Start the service, and the spare connection when prewarm is on."""
        await super().start(frame)
        if self._connection.prewarm and self._spare_task is None:
            self._spare_task = self.create_task(self._keep_spare(), name=f"{self}::prewarm")

    async def stop(self, frame: EndFrame) -> None:
        """Stop the service, the recovery probe and the spare connection."""
        await self._stop_probe()
        await self._stop_prewarm()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame) -> None:
        """Cancel the service, the recovery probe and the spare connection."""
        await self._stop_probe()
        await self._stop_prewarm()
        await super().cancel(frame)

    # -- settings ------------------------------------------------------------------------

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:  # type: ignore[override]
        """Apply a settings delta from the next utterance on, if the result is valid."""
        candidate = self._settings.copy()
        candidate.apply_update(delta)  # type: ignore[arg-type]
        try:
            _, voice = _validated(candidate)
        except InvalidRequestError as exc:
            await self.push_error(
                error_msg=f"{self}: settings update rejected, the current ones stay: {exc.message}",
                category=ErrorCategory.APPLICATION,
            )
            return {}
        if is_given(delta.voice) and not is_given(delta.language):
            delta.language = voice.language
        return await super()._update_settings(delta)

    # -- synthesis -----------------------------------------------------------------------

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        """Push a frame; text the caller did not hear never reaches the LLM context."""
        if direction is not FrameDirection.DOWNSTREAM:
            await super().push_frame(frame, direction)
            return
        if isinstance(frame, InterruptionFrame):
            surviving = set(self.get_audio_contexts())
            self._heard.interrupted(surviving)
            for context_id in self._playback_seconds.keys() - surviving:
                del self._playback_seconds[context_id]
        for heard in self._heard.route(frame):
            await super().push_frame(heard, direction)

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Speak ``text``: one rtts connection per piece within the voice's limit.

        Args:
            text: The text to speak.
            context_id: The audio context the audio belongs to.

        Yields:
            ``TTSAudioRawFrame`` as the audio arrives.
        """
        if not self.audio_context_available(context_id):
            self._playback_seconds.pop(context_id, None)  # its audio starts a new playback
        self._utterance = utterance = Utterance(text)
        yield UtteranceMark(utterance=utterance, context_id=context_id)
        if not spoken_chars(text):  # "😊", "…": nothing to say, so nothing is asked of the cloud
            utterance.finished(ok=True)  # no letters, so none unheard; the reply goes on
            if context_id not in self._reported_silent:
                self._reported_silent.append(context_id)  # a silent context, and rightly so
            await self.cancel_ttfb_metrics()  # type: ignore[no-untyped-call]
            await self.stop_all_metrics()  # type: ignore[no-untyped-call]
            yield UtteranceMark(utterance=utterance, context_id=context_id, end=True)
            return
        heard = False
        try:
            async with self._holding_context(context_id):
                config, voice = _validated(self._settings)
                await self.start_ttfb_metrics()
                for piece in split_text(text, voice.text_limit):
                    async for frame in self._speak(self._request(piece, config, voice), context_id):
                        heard = heard or isinstance(frame, TTSAudioRawFrame)
                        yield frame
            utterance.finished(ok=True)
            if heard:  # the run of failures is over, and any probe of it with it
                self._failures.success()
                await self._stop_probe()
        except RttsError as exc:
            utterance.finished(ok=False)
            await self._report_failure(exc, context_id, utterance.loss())
        except Exception as exc:  # a bug of ours must not escape as a non-RttsError
            logger.exception(f"{self}: unexpected failure")
            utterance.finished(ok=False)
            error = RttsError(f"unexpected {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            await self._report_failure(error, context_id, utterance.loss())
        finally:
            if not heard:
                await self.cancel_ttfb_metrics()  # type: ignore[no-untyped-call]  # no audio: no TTFB
            await self.stop_all_metrics()  # type: ignore[no-untyped-call]
        yield UtteranceMark(utterance=utterance, context_id=context_id, end=True)

    def _request(self, text: str, config: SynthesisConfig, voice: Voice) -> StartRequest:
        rate = str(self.sample_rate)
        if rate not in voice.sample_rates:
            rate = max(voice.sample_rates, key=int)  # the best the voice has; resampled locally
        wire = (
            self._connection.wire_format if self._connection.wire_format in voice.formats else "pcm"
        )
        subtitle = "word_level" if self._word_timestamps and voice.subtitles else None
        if self._word_timestamps and not voice.subtitles:
            warn_once(
                str(self),
                f"voice {voice.name} has no subtitles: its text comes per sentence, "
                "without word timestamps",
            )
        return StartRequest(
            command="START",
            text=text,
            config=config.model_copy(
                update={"sample_rate": rate, "audio_format": wire, "subtitle": subtitle}
            ),
        )

    async def _speak(self, request: StartRequest, context_id: str) -> AsyncGenerator[Frame, None]:
        """One connection, retried while nothing has been heard yet and the fault is transient.

        Every attempt and every pause between attempts comes out of one budget.
        """
        budget = UtteranceBudget(self._connection.timeouts, len(request.text))
        attempt = 0
        while True:
            decoder = WireAudioDecoder(
                request.config.audio_format, request.config.sample_rate_hz, self.sample_rate
            )
            try:
                async for frame in self._stream(
                    request, context_id, decoder, budget, first_try=attempt == 0
                ):
                    yield frame
                return
            except RttsError as exc:
                if decoder.wire_pcm_bytes:
                    raise  # something was spoken: never repeat it
                if not is_transient(exc) or attempt >= self._connection.max_retries:
                    raise
                delay = retry_delay(exc, attempt, self._connection.retry_backoff)
                if delay is None or not budget.allows_retry(delay):
                    raise
                logger.warning(f"{self}: {exc}; retrying in {delay:.2f} s")
                attempt += 1
                await asyncio.sleep(delay)

    async def _stream(
        self,
        request: StartRequest,
        context_id: str,
        decoder: WireAudioDecoder,
        budget: UtteranceBudget,
        *,
        first_try: bool,
    ) -> AsyncGenerator[Frame, None]:
        connection = (self._take_spare() if first_try else None) or await self._connect(
            budget.connect_wait()
        )
        gate = self._utterance.connection()  # words go on only once their audio has arrived
        base = self._playback_seconds.get(context_id, 0.0)  # where this piece's audio starts
        trace_id = ""
        try:
            async for event in stream_synthesis(
                self._url, request, connection=connection, budget=budget
            ):
                if isinstance(event, AudioReceived):
                    if not decoder.wire_pcm_bytes:
                        await self.stop_ttfb_metrics()
                        # Characters count once the cloud speaks them (a failed call is not billed).
                        await self.start_tts_usage_metrics(request.text)
                    pcm = await decoder.decode(event.data)
                    if pcm:
                        yield self._audio_frame(pcm, context_id)
                    await self._add_words(gate.audio(decoder.seconds), context_id, base)
                elif isinstance(event, WordsReceived) and request.config.subtitle:
                    # Only when asked for: else the sentence's text already goes as a whole.
                    await self._add_words(gate.offer(event.words), context_id, base)
                elif isinstance(event, Started):
                    trace_id = event.trace_id
        except RttsError:
            # Cut: what arrived is pushed in full (the resampler holds its last few ms), so
            # the words released as heard are exactly those whose audio the caller gets.
            if decoder.wire_pcm_bytes and (tail := await decoder.finish()):
                yield self._audio_frame(tail, context_id)
            raise
        if not decoder.wire_pcm_bytes and spoken_chars(request.text):
            # Nothing to hear, so nothing of it may enter the LLM context: a failure like
            # any other (one ErrorFrame, counted), also inside a reply whose other
            # sentences had audio, where pipecat's silent-context rule does not look.
            raise SynthesisError("error", "", "END without any audio", trace_id)
        if tail := await decoder.finish():
            yield self._audio_frame(tail, context_id)
        await self._add_words(gate.finish(), context_id, base)
        self._utterance.piece_spoken(request.text)

    def _audio_frame(self, pcm: bytes, context_id: str) -> TTSAudioRawFrame:
        """A frame of ``pcm`` for ``context_id``, counted in its playback's seconds."""
        seconds = len(pcm) / 2 / self.sample_rate
        self._playback_seconds[context_id] = self._playback_seconds.get(context_id, 0.0) + seconds
        return TTSAudioRawFrame(pcm, self.sample_rate, 1, context_id=context_id)

    async def _add_words(self, words: Sequence[WordTiming], context_id: str, base: float) -> None:
        """Hand pipecat ``words`` of a piece whose audio starts ``base`` s into the playback."""
        for run, is_cjk in _word_runs(words, base):
            # Chinese words are written without spaces between them; others with.
            await self.add_word_timestamps(run, context_id, includes_inter_frame_spaces=is_cjk)

    async def on_audio_context_completed(self, context_id: str) -> None:
        """The playback of ``context_id`` ended: audio for it later starts a new playback."""
        self._playback_seconds.pop(context_id, None)
        await super().on_audio_context_completed(context_id)

    async def _connect(self, wait: Wait | None = None) -> ClientConnection:
        """A handshaken connection (credentials included) within ``wait``, else connect_timeout."""
        if wait is None:
            limit = self._connection.connect_timeout
            wait = Wait("connect", limit, limit, "connect_timeout")
        try:
            async with asyncio.timeout(wait.seconds):  # the IAM token fetch counts too
                return await open_authenticated(
                    self._url,
                    self._auth,
                    extra_headers=self._connection.extra_headers(),
                    connect_timeout=wait.seconds,
                )
        except (TimeoutError, RttsTimeoutError):
            raise RttsTimeoutError("connect", wait.limit, setting=wait.setting) from None

    # -- timing, failures and usability --------------------------------------------------

    @asynccontextmanager
    async def _holding_context(self, context_id: str) -> AsyncIterator[None]:
        """Keep pipecat's audio context open while this utterance is within its budget.

        pipecat closes a context after ``stop_frame_timeout_s`` without audio; a server
        that is slow but within the budget (first audio after 4 s, a pause mid-utterance)
        would see its utterance split over two TTSStarted/TTSStopped pairs.
        """
        interval = max(self._stop_frame_timeout_s / 3, 0.01)

        async def refresh() -> None:
            while True:
                self._refresh_audio_context(context_id)
                await asyncio.sleep(interval)

        task = self.create_task(refresh(), name=f"{self}::hold-context")
        try:
            yield
        finally:
            await self.cancel_task(task)

    async def tts_process_generator(
        self, context_id: str, generator: AsyncGenerator[Frame | None, None]
    ) -> None:
        """Run ``run_tts``; its audio context then closes with the turn, audio or not.

        ``run_tts`` yields every frame of its utterance before returning, even when it
        yielded none (a failure): the context ends when the turn does, not
        ``stop_frame_timeout_s`` later with a second count of the failure.
        """
        await super().tts_process_generator(context_id, generator)
        self._is_yielding_frames_synchronously = True

    async def _record_context_audio_outcome(self, context_id: str, received_audio: bool) -> None:
        """Pipecat's silent-context rule, except for a failure this service already counted."""
        if context_id in self._reported_silent:
            self._reported_silent.remove(context_id)
            if not received_audio:
                return
        await super()._record_context_audio_outcome(context_id, received_audio)

    async def _report_failure(self, error: RttsError, context_id: str, loss: str) -> None:
        """One ErrorFrame per failed utterance; a run of transient ones costs usability.

        ``loss`` says what of the utterance the caller did not hear (and so the LLM context
        does not hold).
        """
        self._reported_silent.append(context_id)
        category = error_category(error)
        message = f"{self}: {error}; {loss}"
        if category.is_permanent:
            await self.push_error(error_msg=message, exception=error, category=category)
        elif self._failures.failure():
            count = self._failures.count
            why = (
                "failed again after the probe brought it back"
                if self._failures.probation
                else f"{count} failed utterance{'s' if count > 1 else ''} in a row"
            )
            await self.push_error(
                error_msg=f"{message}; {why}: unusable until the cloud answers a probe",
                exception=error,
                category=category,
                force_treat_as_permanent=True,
            )
            if self._probe_task is None:  # else the one in progress goes on
                self._probe_task = self.create_task(self._probe(), name=f"{self}::probe")
        else:
            await self.push_error(error_msg=message, exception=error, category=category)

    async def _probe(self) -> None:
        """Handshake (no START, nothing billed) with back-off until the cloud answers.

        A refusal no probe can change (rejected credentials) ends it: one ErrorFrame of
        its category, and the service stays unusable until its settings change.
        """

        async def handshake() -> None:
            release(await self._connect())

        try:
            await probe_until_answered(
                handshake,
                self._failures.backoff,
                label=str(self),
                final=lambda error: error_category(error).is_permanent,
            )
        except RttsError as exc:  # e.g. the credentials were revoked during the outage
            self._probe_task = None
            await self.push_error(
                error_msg=f"{self}: recovery probe: {exc}; unusable until its settings change",
                exception=exc,
                category=error_category(exc),
            )
            return
        outage = self._failures.outage_seconds()
        logger.info(f"{self}: the cloud answers again after {outage:.1f} s; usable")
        self._probe_task = None
        self._failures.recovered()
        # pipecat's set_usable, not ours: that would forgive the run (no probation).
        await TTSService.set_usable(self, True)
        await self._call_event_handler("on_recovered", outage)

    async def set_usable(self, is_usable: bool) -> None:
        """Set whether the service is given work; ``True`` also forgets the failures.

        A recovery probe in progress goes on: pipecat calls this on every settings update,
        also during an outage, and the probe's ``on_recovered`` is what tells a
        ``ServiceSwitcher``'s application to switch back once the cloud answers.
        """
        if is_usable and self._probe_task is not None:
            self._failures.forgive()
        elif is_usable:
            self._failures.success()
        await super().set_usable(is_usable)

    async def _stop_probe(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None:
            await self.cancel_task(task)

    # -- prewarm -------------------------------------------------------------------------

    def _take_spare(self) -> ClientConnection | None:
        """The spare connection, if it is open and young enough; it is then replaced."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        self._spare_taken.set()
        fresh = time.monotonic() - spare.opened < self._connection.prewarm_max_age
        if fresh and spare.connection.state is State.OPEN:
            self.prewarm_hits += 1
            return spare.connection
        self.create_task(_discard(spare.connection), name=f"{self}::discard-spare")
        return None

    async def _keep_spare(self) -> None:
        """Keep one handshaken connection ready, replaced before the cloud's idle cut-off."""
        max_age = self._connection.prewarm_max_age
        while True:
            self._spare_taken.clear()
            try:
                connection = await self._connect()
            except RttsError as exc:
                logger.warning(
                    f"{self}: prewarm connection failed, trying again in {max_age:g} s: {exc}"
                )
                await asyncio.sleep(max_age)
                continue
            self._spare = _Spare(connection, time.monotonic())
            try:
                await asyncio.wait_for(self._spare_taken.wait(), timeout=max_age)
            except TimeoutError:
                stale, self._spare = self._spare, None
                if stale is not None:
                    await _discard(stale.connection)

    async def _stop_prewarm(self) -> None:
        if self._spare_task is not None:
            await self.cancel_task(self._spare_task)
            self._spare_task = None
        spare, self._spare = self._spare, None
        if spare is not None:
            await _discard(spare.connection)


def _word_runs(
    words: Sequence[WordTiming], base: float
) -> list[tuple[list[tuple[str, float]], bool]]:
    """Word times (seconds from the playback's first audio) in runs of CJK / other words."""
    runs: list[tuple[list[tuple[str, float]], bool]] = []
    for word in words:
        if not word.text.strip():
            continue  # the docs show an empty closing item
        item = (word.text, base + word.start_time / 1000)
        is_cjk = _CJK.search(word.text) is not None
        if runs and runs[-1][1] == is_cjk:
            runs[-1][0].append(item)
        else:
            runs.append(([item], is_cjk))
    return runs


async def _discard(connection: ClientConnection) -> None:
    """Close an unused connection politely, but never wait long for it."""
    try:
        async with asyncio.timeout(1.0):
            await connection.close()
    except TimeoutError:
        connection.transport.abort()


def _resolve_connection(
    connection: HuaweiRTTSConnection | None, **overrides: str | None
) -> HuaweiRTTSConnection:
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        if connection is None:
            return HuaweiRTTSConnection(**given)  # type: ignore[arg-type]
        return HuaweiRTTSConnection.model_validate({**dict(connection), **given})
    except ValueError as exc:
        raise InvalidSettingsError(
            f"invalid HuaweiRTTSService connection settings: {_explain(exc)}"
        ) from None


def _explain(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors():
        where = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
