"""The node store: content-addressed trees and blobs, tags, durability, the cache's room."""
