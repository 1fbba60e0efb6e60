"""JSON over HTTP/1.1: every unary RPC in the Connect protocol, and room for more routes.

The HTTP server forwards each call to this process's own gRPC server over a private
Unix socket, so authentication, validation, the ``Guard`` interceptor and metrics are
the very ones gRPC callers get; nothing here decides anything. docs/api.md, "JSON over HTTP".
"""
