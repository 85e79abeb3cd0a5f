"""What a request says: volume attributes, image references, digests, credentials.

Everything here is parsed from values a pod author or a Secret sets, and
nothing here touches the network or the disk: the rest of the data path
receives only what passed these parsers.
"""
