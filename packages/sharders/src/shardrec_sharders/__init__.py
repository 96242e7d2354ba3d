"""The built-in sharders of shardrec, registered through the ``shardrec`` entry-point group."""
