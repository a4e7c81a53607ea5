"""ctypes binding to the espeak-ng library shipped in the ``espeakng-loader`` wheel.

espeak-ng keeps global state (voice, parameters, one callback), so an :class:`Espeak` must
be used from one thread only; :class:`~gateway.engine.worker.SynthesisWorker` owns that
thread. Audio comes out as 16-bit mono PCM at :attr:`Espeak.sample_rate` (22050 Hz) in
chunks of ``chunk_ms``, together with word and phoneme events giving positions in the text
and in the audio.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import espeakng_loader

from gateway.errors import EngineError

_AUDIO_OUTPUT_SYNCHRONOUS: Final = 2
_INITIALIZE_PHONEME_EVENTS: Final = 0x0001
_POS_CHARACTER: Final = 1
_CHARS_UTF8: Final = 1
_ENDPAUSE: Final = 0x1000
_PARAM_RATE: Final = 1
_PARAM_VOLUME: Final = 2
_PARAM_PITCH: Final = 3

_EVENT_LIST_TERMINATED: Final = 0
_EVENT_WORD: Final = 1
_EVENT_END: Final = 5
_EVENT_PHONEME: Final = 7


class _EventId(ctypes.Union):
    _fields_ = (("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8))


class _Event(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    )


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True, slots=True)
class Mark:
    """A word start, phoneme start or end-of-clause mark inside one synthesized text.

    ``text_position`` is a 1-based character index into the text (words only);
    ``sample`` is the audio position in samples at the library's rate.
    """

    kind: str  # "word", "phoneme" or "end"
    sample: int
    text_position: int = 0
    phoneme: str = ""


# Called with each chunk of PCM and the marks that came with it; return False to abort.
ChunkHandler = Callable[[bytes, list[Mark]], bool]


class Espeak:
    """The espeak-ng library, initialized once per process for synchronous synthesis."""

    _instance: Espeak | None = None
    _instance_lock = threading.Lock()

    def __init__(self, chunk_ms: int) -> None:
        try:
            self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path().encode()
        except (OSError, RuntimeError) as exc:
            raise EngineError(f"cannot load espeak-ng from espeakng-loader: {exc}") from exc
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        )
        self._lib.espeak_SetVoiceByName.argtypes = (ctypes.c_char_p,)
        self._lib.espeak_SetParameter.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
        self._lib.espeak_Synth.argtypes = (
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        )
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, chunk_ms, data_path, _INITIALIZE_PHONEME_EVENTS
        )
        if rate <= 0:
            raise EngineError(f"espeak-ng failed to initialize (returned {rate})")
        self.sample_rate: int = rate
        self._handler: ChunkHandler | None = None
        self._failure: BaseException | None = None
        # Keep a reference: ctypes must not free the trampoline while espeak holds it.
        self._callback = _SynthCallback(self._on_audio)
        self._lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def shared(cls, chunk_ms: int) -> Espeak:
        """The process-wide instance (espeak-ng cannot be initialized twice usefully)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls(chunk_ms)
            return cls._instance

    def synthesize(
        self,
        text: str,
        voice: str,
        *,
        rate_wpm: int,
        pitch: int,
        volume: int,
        on_chunk: ChunkHandler,
    ) -> None:
        """Speak ``text`` with an espeak voice name, calling ``on_chunk`` as audio is made.

        ``rate_wpm`` is words per minute (80..450), ``pitch`` 0..100, ``volume`` 0..200.

        Raises:
            EngineError: the voice is missing or synthesis failed.
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EngineError(f"espeak-ng has no voice {voice!r}")
        for parameter, value in (
            (_PARAM_RATE, rate_wpm),
            (_PARAM_PITCH, pitch),
            (_PARAM_VOLUME, volume),
        ):
            self._lib.espeak_SetParameter(parameter, value, 0)
        encoded = text.encode("utf-8")
        self._handler, self._failure = on_chunk, None
        try:
            status = self._lib.espeak_Synth(
                encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None
            )
        finally:
            self._handler = None
        if self._failure is not None:
            raise EngineError(f"synthesis callback failed: {self._failure!r}") from self._failure
        if status != 0:
            raise EngineError(f"espeak_Synth failed with status {status}")

    def _on_audio(
        self, wav: ctypes._Pointer[ctypes.c_short], samples: int, events: ctypes._Pointer[_Event]
    ) -> int:
        handler = self._handler
        if handler is None:
            return 1
        marks: list[Mark] = []
        index = 0
        while events[index].type != _EVENT_LIST_TERMINATED:
            event = events[index]
            if event.type == _EVENT_WORD:
                marks.append(Mark("word", event.sample, event.text_position))
            elif event.type == _EVENT_PHONEME:
                name = event.id.string.decode("utf-8", "replace")
                marks.append(Mark("phoneme", event.sample, event.text_position, name))
            elif event.type == _EVENT_END:
                marks.append(Mark("end", event.sample, event.text_position))
            index += 1
        pcm = ctypes.string_at(wav, samples * 2) if samples > 0 and wav else b""
        try:
            return 0 if handler(pcm, marks) else 1
        except BaseException as exc:  # an exception must not unwind through C
            self._failure = exc
            return 1
