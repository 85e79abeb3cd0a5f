"""OCI and the registries: manifests, packagings, the registry client and its transfers.

Parsers of what a registry serves (manifests, indexes, configs, how an
artifact's layers become files), the client that fetches them from a
registry and its mirrors (auth, tokens, retries, resumed and parallel
ranges), the bounded reader of every body kept whole, the egress policy,
and registries.toml.
"""
