"""The hub side: collectors that take findings, feedback and device status off the broker and store them
(SQLite for one small hub, PostgreSQL for a fleet), and the report/export over what they stored.

It never runs on a scanner; the device package (edge_runtime) does not import it, except `edge-runtime collect`
and `edge-runtime hub`, which load it lazily.
"""
