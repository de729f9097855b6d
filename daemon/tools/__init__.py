"""Tools built on the daemon: the load test and its report, and the demo kinds."""
