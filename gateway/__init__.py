"""The rtts sidecar gateway: serves the rtts protocol to bots, with metering and limits."""
