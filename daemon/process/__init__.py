"""The process: the supervisor that starts the store, the actors and the listeners in order and
stops them in reverse; systemd integration; the listeners (admin socket, WebSocket, HTTP) and
the command layer they share (commands.py)."""
