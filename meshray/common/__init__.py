"""What both sides of a node share: the daemon (`meshray.node`) and the processes it serves (`meshray.core`).

The two sides never import each other; a format or file they must agree on
(id layout, the lease fence page, argument-file names, the worker-output
marker) lives here, below both.
"""
