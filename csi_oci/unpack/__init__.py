"""Unpacking: the hardened tar applier, the in-root path rules, and the budgets.

Layers are applied with directory-fd-relative, no-follow operations into a
staging root; whatever a tar says, nothing lands outside it.
"""
