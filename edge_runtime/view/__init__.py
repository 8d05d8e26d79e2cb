"""The local web view (issue 14): live pictures with their overlay, findings, health and clinicians' feedback.

`Pictures` (pictures.py) is what the service's workers hand over; `ViewServer` (server.py) serves the page and the
endpoints from the daemon. The service imports server.py (and aiohttp) only when `[view] enabled`.
"""
from edge_runtime.view.pictures import Picture, Pictures

__all__ = ["Picture", "Pictures"]
