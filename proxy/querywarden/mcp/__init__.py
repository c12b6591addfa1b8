"""``querywarden mcp``: an MCP front door to the gateway (docs/mcp.md).

``wire`` frames one statement's exchange (sans I/O), ``client`` moves its bytes to the
gateway, ``tokens`` finds the agent's token, ``admin`` asks the admin API, ``tools`` is
what each tool does, and ``server`` binds them to the MCP SDK on stdio or HTTP.
"""
