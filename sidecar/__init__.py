"""Metering sidecar: durable vLLM usage events, aggregated hourly and reported to AWS Marketplace."""

__version__ = "0.1.0"
