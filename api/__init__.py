"""HTTP views of the control plane: they read tables (routed to the owner) and produce commands."""
