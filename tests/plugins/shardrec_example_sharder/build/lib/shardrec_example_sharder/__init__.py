"""An example third-party shardrec plugin (see docs/plugins.md)."""
