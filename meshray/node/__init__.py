"""The node daemon: a peer that runs work, stores objects, holds an etcd lease."""
