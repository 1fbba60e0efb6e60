"""The web console: pages, sign-in and sessions on the HTTP server (docs/console.md)."""
