"""The client side of the wire: binding the listener, reading requests as uvicorn protocols."""
