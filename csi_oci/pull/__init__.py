"""Pulling: resolve a reference, then one background job per tree that fetches,
verifies and unpacks its layers into the store.
"""
