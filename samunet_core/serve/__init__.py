"""`samunet serve`: the engine behind an HTTP server (app.py), its wire format (protocol.py), how it runs (server.py).
The client side is samunet_core/remote.py."""
