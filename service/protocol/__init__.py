"""Wire protocols: each converts to and from service.types and calls one data plane."""
