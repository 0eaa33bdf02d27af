"""invoisx-proxy: an authenticating reverse proxy for the InvoisX e-invoice API."""

__version__ = "0.1.0"
