"""The embedded local engine: an rtts-compatible synthesizer on espeak-ng."""
