"""cpctl: the command-line client of the control plane (see README "Command-line client")."""
