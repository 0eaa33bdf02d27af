"""`invoisx-proxy demo` and `sandbox`: the proxy in front of the embedded sandbox, and the tour."""
