"""Infrastructure shared by every room: paths, command-line helpers, configs, I/O, distributed set-up."""
