"""Lazily read layers: eStargz and zstd:chunked formats, verified reads, prefetch,
and the read-only FUSE filesystem served from them.

Like stargz-snapshotter's `estargz` package, the format modules (toc,
estargz, zstdchunked) know only formats: how to find and trust a layer's
table of contents, and how to turn a compressed range of the blob into
verified file bytes. Fetching is a function given to them, so the same code
serves registry range requests, a local cache or a test's bytes. `reader`
adds the verified piece cache, `prefetch` the background fill, `fs` the
FUSE filesystem and its server process.
"""
