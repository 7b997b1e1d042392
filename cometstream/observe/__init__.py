"""Observability: metrics, logging, health endpoints and systemd notification."""
