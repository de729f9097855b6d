"""The wire: everything that crosses a socket, in one place, importing nothing of jobwarden's
but itself. `views` is what a job, an event and an error look like to any client; `admin` is the
admin socket's requests and replies; `websocket` is the WebSocket's ops and frames."""
