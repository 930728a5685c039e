"""The `vdsh` command line and the HTTP server. May import every other part of vdsh."""
