"""The grid dashboard: an HTTPS page served by `gridpresence up` (see server.py)."""

from gridpresence.services.dashboard.server import Dashboard

__all__ = ["Dashboard"]
