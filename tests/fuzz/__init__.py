"""Coverage-guided fuzzing (atheris / libFuzzer) of csi-oci's parsers of hostile input.

One module per target; each defines

* ``NAME`` (the target's CLI name), ``MAX_LEN`` (libFuzzer ``-max_len``),
  ``DICT`` (tokens for libFuzzer's ``-dict``, may be empty), and
* ``target(data: bytes) -> None``: feeds ``data`` to the driver's code.

The finding rule lives in tests/fuzz/common.py: a ``CsiOciError`` (an
expected refusal) is fine; any other exception escaping ``target``, a hang
(per-input CPU timer, then libFuzzer's ``-timeout``) or unbounded memory
(``-rss_limit_mb``) is a finding.

    python -m tests.fuzz list
    python -m tests.fuzz seeds [--force]
    python -m tests.fuzz TARGET|all --seconds N [--report out.json] [--jobs J]
    python -m tests.fuzz replay TARGET FILE_OR_DIR...

Seeds are made by the reference tools (tests/fuzz/seeds.py) and cached in
.cache/fuzz-seeds. See tests/fuzz/__main__.py for the options, hack/fuzz for
the all-targets run, tests/test_fuzz.py for the bounded run in the suite.
"""

from __future__ import annotations

# target name -> module under tests.fuzz
TARGETS: dict[str, str] = {
    "estargz-blob": "t_estargz_blob",
    "estargz-toc": "t_estargz_toc",
    "zstd-stargz-blob": "t_zstd_stargz_blob",
    "zstd-stargz-toc": "t_zstd_stargz_toc",
    "zstd-containers-blob": "t_zstd_containers_blob",
    "zstd-containers-toc": "t_zstd_containers_toc",
    "tar": "t_tar",
    "manifest": "t_manifest",
    "registry": "t_registry",
    "signatures": "t_signatures",
}
