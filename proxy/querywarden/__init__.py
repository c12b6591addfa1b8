"""querywarden: a PostgreSQL wire-protocol gateway for AI coding agents.

It authenticates, authorizes, masks and audits every statement an agent (or anyone else)
sends to a database.
"""

__version__ = "0.1.0"
