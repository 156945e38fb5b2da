"""The sans-IO core: what travels between visitor, server, agent and local service.

Nothing in this package does I/O or imports trio; it maps requests and responses
onto HTTP/2 header lists, names the handshake's fields and validates host names,
so it is tested with plain bytes in and values out.
"""
