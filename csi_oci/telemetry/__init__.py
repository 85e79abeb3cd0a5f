"""Telemetry: Prometheus instruments, the lazy servers' stats files, /metrics and
/healthz, and log formatting.
"""
