"""Signatures at mount: the node publishes only what its signature policy trusts.

The data path is resolve -> verify -> fetch -> store -> mount: a rule that
signs manifests is checked before a byte of the image is pulled, one that
signs files (model-signing) against the unpacked tree before it is bound.

- policy: the operator's rules (TOML), matched by registry/repository prefix;
- trust: keys, certificate roots and identities, and the checks on them;
- discover: where signatures live (cosign's tag, OCI 1.1 referrers and their
  fallback tag), fetched by digest through mirrors;
- cosign, bundle, notation, models: one module per envelope format;
- verifier: a rule against an image, with results cached per (digest, rule).
"""
