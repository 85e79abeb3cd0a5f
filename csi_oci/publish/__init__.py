"""Publishing: volume records, bind mounts, and the FUSE servers of lazy volumes.

The last stage of the data path: a tree from the store (or a lazy image's
FUSE mount) is bound read-only at a pod's target path, recorded on disk
first so restarts lose nothing.
"""
