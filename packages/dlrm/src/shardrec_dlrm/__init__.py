"""The ``dlrm`` command: DLRM and DCNv2 training on Criteo with shardrec."""
