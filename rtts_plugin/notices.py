"""Warnings worth giving once per service and cause, not on every utterance."""

from __future__ import annotations

from functools import lru_cache

from loguru import logger


@lru_cache(maxsize=1024)
def warn_once(owner: str, message: str) -> None:
    """Log ``owner: message`` as a warning the first time this pair is seen."""
    logger.warning(f"{owner}: {message}")
