"""State shared by the proxies that hold one token, on Redis (INVOISX_PROXY_REDIS_URL)."""
